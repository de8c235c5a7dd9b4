"""Model directories and training checkpoints on disk.

A model directory (`config.yaml` + orbax `params/` + `reference.json`, what export needs) is what
`python -m valle_jax.convert import` writes and what synthesis, parity and fine-tuning load. It is written
under a temporary name and renamed at the end: never half-written. In a multi-process run it is a local
artifact of the process that writes or reads it (no cross-process barriers).

A training checkpoint (`TrainCheckpoints`) is one orbax step directory `run_dir/checkpoints/<step>/` holding
`state` (the sharded train state, each process writing its shards), `data` (the grain iterator state of every
process) and `meta` (the run config and a few facts), saved asynchronously; orbax writes each step under a
temporary name and renames it when complete, so a run killed mid-save leaves the previous steps intact.
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


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """Orbax checkpointer for host-local numpy trees: in a multi-process run only this process takes part."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"local{me}")
    return ocp.StandardCheckpointer(multiprocessing_options=options)


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
        with _local_checkpointer() as ckptr:
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
    with _local_checkpointer() as ckptr:
        meta = ckptr.metadata(path.absolute() / PARAMS_DIR)
        tree = getattr(meta, "item_metadata", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
        params = ckptr.restore(path.absolute() / PARAMS_DIR, target)
    params = jax.tree.map(np.asarray, params) if dtype is None else cast_tree(params, dtype)
    ref_file = path / REFERENCE_FILE
    reference = json.loads(ref_file.read_text()) if ref_file.is_file() else {}
    return cfg, params, reference


def cast_tree(tree: Any, dtype: Any, to: Any = np.asarray) -> Any:
    """Every leaf of a parameter tree as `to(leaf, dtype)` (numpy by default, `jnp.asarray` for device arrays)."""
    return jax.tree.map(lambda a: to(a, dtype), tree)


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints: train state + data iterator + config, with orbax's CheckpointManager.

CHECKPOINTS_DIR = "checkpoints"


class TrainCheckpoints:
    """Async, keep-last-N checkpoints of (train state, data iterator, metadata) under `run_dir/checkpoints`.

    Every process of a run constructs it and calls `save` / `restore` at the same steps (orbax coordinates the
    processes). The state must consist of global `jax.Array`s (host-local single-device arrays are refused
    by orbax in a multi-process run). The data iterator is any grain `DatasetIterator` (or anything with
    get_state/set_state that grain's checkpoint handler accepts); each process saves its own iterator state.
    """

    def __init__(self, run_dir: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = (Path(run_dir) / CHECKPOINTS_DIR).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep) if keep and keep > 0 else None,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first (orbax lists only finalized step directories)."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_iterator: Any = None, meta: dict | None = None, wait: bool = False) -> bool:
        """Start saving `step` (returns at once unless `wait`; arrays are copied off the devices first)."""
        import grain

        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        if wait:
            self.manager.wait_until_finished()
        return saved

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> tuple[int, Any, dict]:
        """(step, state laid out as `abstract_state` (ShapeDtypeStructs with shardings), meta); the data
        iterator, if given, is set to the saved position in place. Default step: the newest complete one,
        falling back to older ones if the newest cannot be read."""
        import grain

        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint")
        errors = []
        for s in candidates:
            items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                out = self.manager.restore(int(s), args=ocp.args.Composite(**items))
            except Exception as e:  # a damaged step: say so, move it aside, try the one before
                if step is not None:
                    raise
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                self._set_aside(int(s), e)
                continue
            return int(s), out["state"], dict(out["meta"] or {})
        raise RuntimeError(f"{self.directory}: no checkpoint could be restored:\n" + "\n".join(errors))

    def _set_aside(self, step: int, error: Exception) -> None:
        """Rename an unreadable step directory to `<step>.unreadable-<time>` (orbax then ignores it, and a later
        save of that step does not collide with it)."""
        import time
        import warnings

        src = self.directory / str(step)
        dst = self.directory / f"{step}.unreadable-{int(time.time())}"
        warnings.warn(f"{src}: checkpoint could not be restored ({type(error).__name__}: {error}); moved to {dst.name}, "
                      "trying an older one", stacklevel=3)  # fmt: skip
        if jax.process_index() == 0 and src.exists():
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"valle_jax_set_aside_{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
