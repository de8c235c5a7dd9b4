"""Model directories on disk: `config.yaml` + orbax `params/` + `reference.json` (what export needs).

A model directory is what `python -m valle_jax.convert import` writes and what synthesis, parity and
fine-tuning load. It is written under a temporary name and renamed at the end: never half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from valle_jax.config import ConfigError, ModelConfig, load_yaml, save_yaml

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
REFERENCE_FILE = "reference.json"


def save_model_dir(path: str | Path, cfg: ModelConfig, params: dict, reference: dict | None = None, force: bool = False) -> Path:
    """Write cfg + params (leaves kept in their own dtype, e.g. bfloat16 as imported) + reference metadata."""
    path = Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is an ordinary output
    try:
        save_yaml(cfg, tmp / CONFIG_FILE)
        (tmp / REFERENCE_FILE).write_text(json.dumps(reference or {}, indent=1))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, jax.tree.map(np.asarray, params))
            ckptr.wait_until_finished()
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_model_dir(path: str | Path, dtype: Any = None) -> tuple[ModelConfig, dict, dict]:
    """(config, params as numpy in their stored dtype (or cast to `dtype`), reference metadata)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise ConfigError(f"{path}: not a valle_jax model directory (expected {CONFIG_FILE} and {PARAMS_DIR}/)")
    cfg = load_yaml(path / CONFIG_FILE)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path.absolute() / PARAMS_DIR)
        tree = getattr(meta, "item_metadata", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
        params = ckptr.restore(path.absolute() / PARAMS_DIR, target)
    params = jax.tree.map(np.asarray, params)
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    ref_file = path / REFERENCE_FILE
    reference = json.loads(ref_file.read_text()) if ref_file.is_file() else {}
    return cfg, params, reference
