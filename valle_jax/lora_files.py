"""The reference's LoRA files (.sft / .pth) in and out, and merging a LoRA into a model (spec reference-lora.md).

A LoRA file holds only `lora_A` [rank, in] / `lora_B` [out, rank] tensors named as in the full state dict
(`model.layers.0.self_attn.q_proj.lora_A`) plus the LoRA's config: `.sft` metadata `config` (JSON), `.pth`
`{"module" (or "lora"): tensors, "config": dict}`. Names go through convert.py's table: the key's module with
`.weight` must be a Dense kernel of the model. Tensors keep their dtype and key order and the metadata is kept
verbatim, so import followed by export gives back the same file contents bit for bit.

    python -m valle_jax.convert merge BASE LORA OUT_DIR [--heads N] [--all-levels] [--force]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import unflatten_dict

from valle_jax.config import ModelConfig
from valle_jax.convert import (
    DTYPES,
    CheckpointError,
    _is_float,
    output_container,
    param_path,
    params_key,
    read_reference,
    read_safetensors_metadata,
    write_pth,
    write_safetensors,
)
from valle_jax.models.lora import LORA_A, LORA_B, LoraConfig, LoraError, adapters, check_lora, merge_lora

SUFFIXES = (LORA_A, LORA_B)


def _module_path(key: str, src: str) -> tuple[tuple[str, ...], str, bool]:
    """`model.layers.0.mlp.up_proj.lora_A` -> (module path, "lora_A", transpose?) through convert's table."""
    module, _, leaf = key.rpartition(".")
    if leaf not in SUFFIXES or not module:
        raise CheckpointError(f"{src}: key {key!r} is not a LoRA tensor (expected <module>.lora_A / <module>.lora_B)")
    try:
        path, transpose = param_path(module + ".weight")
    except KeyError:
        raise CheckpointError(f"{src}: key {key!r}: unknown LoRA target {module!r} (not a projection of a VALL-E model)") from None
    if path[-1] != "kernel":
        raise CheckpointError(f"{src}: key {key!r}: unknown LoRA target {module!r} (not a Linear layer)")
    return path[:-1], leaf, transpose


def _lora_config(meta: dict, src: str, config: dict | LoraConfig | None) -> LoraConfig:
    if isinstance(config, LoraConfig):
        return config
    entry = config if config is not None else meta.get("config")
    if entry is None:
        raise CheckpointError(f"{src}: no 'config' metadata (the LoRA's rank and alpha); give the config explicitly")
    try:
        return LoraConfig.from_dict(entry, where=f"{src}: config")
    except LoraError as e:
        raise CheckpointError(str(e)) from e
    except TypeError as e:  # a field of the wrong type that the dataclass cannot take
        raise CheckpointError(f"{src}: config {entry!r}: {e}") from e


def read_lora(path: str | Path, cfg: ModelConfig, params: dict | None = None,
              config: dict | LoraConfig | None = None) -> tuple[LoraConfig, dict, dict]:  # fmt: skip
    """A reference LoRA file -> (config, LoRA params in the file's dtypes, reference info for `write_lora`).

    `cfg` / `params` (arrays or shapes) are the base model the LoRA must fit; `config` replaces the file's
    config metadata (needed when a file has none). Refuses a file that is not a LoRA, a tensor on a module that
    is not a LoRA target of this model, and a shape that does not fit the base."""
    path = Path(path)
    src = str(path)
    tensors, meta, container = read_reference(path)
    lora_keys = [k for k in tensors if k.rpartition(".")[2] in SUFFIXES]
    if not lora_keys:
        shown = ", ".join(list(tensors)[:3])
        raise CheckpointError(f"{src}: not a LoRA file (no *.lora_A / *.lora_B tensors; it holds {shown} ...)")
    lora_cfg = _lora_config(meta, src, config)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    names = {}
    for key, arr in tensors.items():
        module_path, leaf, transpose = _module_path(key, src)
        names[module_path] = key.rpartition(".")[0]
        if arr.ndim != 2:
            raise CheckpointError(f"{src}: key {key!r} has shape {list(arr.shape)}, expected a matrix")
        value = arr.T if transpose else arr  # [in, r] / [r, out], as Dense kernels
        rank = value.shape[1] if leaf == LORA_A else value.shape[0]
        if rank != lora_cfg.rank:
            raise CheckpointError(f"{src}: key {key!r} has shape {list(arr.shape)}: rank {rank}, the config says rank {lora_cfg.rank}")
        flat[module_path + (leaf,)] = np.ascontiguousarray(value)
    lora_params = unflatten_dict(flat)
    try:
        lora_cfg.validate(cfg.resp_levels, where=f"{src}: config")
        adapters(lora_params)
        check_lora(cfg, lora_params, params, where=src, names=names)
    except LoraError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(src) else f"{src}: {msg}") from e
    raw_meta = read_safetensors_metadata(path) if container == "sft" else meta
    reference = {"container": container, "keys": list(tensors), "metadata": raw_meta}
    return lora_cfg, lora_params, reference


def lora_state(lora_params: dict, key_order: list[str] | None = None, dtype: Any = None) -> dict[str, np.ndarray]:
    """LoRA params -> the reference's tensors ([rank, in] / [out, rank]), keys in `key_order` where given."""
    state = {}
    for module_path, pair in adapters(lora_params).items():
        base = params_key(module_path + ("kernel",))  # "...q_proj.weight"
        _, transpose = param_path(base)
        for leaf, value in zip(SUFFIXES, pair):
            arr = np.asarray(value)
            arr = arr.T if transpose else arr
            if dtype is not None and _is_float(arr):
                arr = arr.astype(dtype)
            state[base[: -len("weight")] + leaf] = np.ascontiguousarray(arr)
    if key_order:
        ordered = {k: state[k] for k in key_order if k in state}
        ordered.update({k: v for k, v in state.items() if k not in ordered})
        state = ordered
    return state


def write_lora(path: str | Path, lora_cfg: LoraConfig, lora_params: dict, reference: dict | None = None,
               dtype: str | None = None) -> Path:  # fmt: skip
    """Write a LoRA in the reference's format (.sft or .pth); `reference` (from `read_lora`) keeps the key order
    and, while the config is unchanged, the metadata verbatim. `dtype` casts the tensors (the reference
    exports float16 by default; here the default is the params' own dtype)."""
    path = Path(path)
    container = output_container(path, dtype)
    reference = reference or {}
    state = lora_state(lora_params, reference.get("keys"), DTYPES[dtype] if dtype else None)
    config = lora_cfg.reference_dict()
    kept = reference.get("metadata") if reference.get("container") == container else None
    if container == "sft":
        same = kept and isinstance(kept.get("config"), str) and _json_or_none(kept["config"]) == config
        write_safetensors(path, state, dict(kept) if same else {"config": json.dumps(config)})
    else:
        same = kept and kept.get("config") == config
        write_pth(path, state, dict(kept) if same else {"config": config})
    return path


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def load_base(path: str | Path, heads: int | None = None) -> tuple[ModelConfig, dict, dict]:
    """A model directory or a reference .sft/.pth -> (config, params in their stored dtypes, reference info)."""
    path = Path(path)
    if path.is_dir():
        from valle_jax.checkpoint import load_model_dir

        return load_model_dir(path)
    from valle_jax.convert import load_reference

    return load_reference(path, heads=heads)


def merge_files(base: str | Path, lora: str | Path, out_dir: str | Path, heads: int | None = None,
                all_levels: bool = False, force: bool = False) -> Path:  # fmt: skip
    """Fold a LoRA file into a base model and write the merged model directory (kernels keep the base's dtype;
    the base's reference metadata is kept, so `convert export` writes a reference checkpoint of it)."""
    import jax

    from valle_jax.checkpoint import save_model_dir

    cfg, params, reference = load_base(base, heads)
    lora_cfg, lora_params, _ = read_lora(lora, cfg, params)
    try:
        merged = merge_lora(params, lora_params, lora_cfg, all_levels=all_levels)
    except LoraError as e:
        raise CheckpointError(f"{lora}: {e}") from e
    return save_model_dir(out_dir, cfg, jax.tree.map(np.asarray, merged), reference, force=force)
