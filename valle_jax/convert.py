"""Reference checkpoints (.sft / .pth) <-> valle_jax model directories, losslessly.

    python -m valle_jax.convert import SRC.(sft|pth) DST_DIR [--config X.yaml] [key=value ...] [--force]
                                      [--ignore-metadata-config]
    python -m valle_jax.convert export SRC_DIR DST.(sft|pth) [--dtype bfloat16|float16|float32] [--force]
    python -m valle_jax.convert merge BASE(DIR|.sft|.pth) LORA.(sft|pth) DST_DIR [--heads N] [--all-levels] [--force]

One table (`NAME_RULES`) maps reference state-dict keys to parameter paths; Linear weights are [out, in] in
PyTorch and transposed for Dense kernels. Every tensor of the file is kept, used or not, with its dtype, and
the file's metadata is kept verbatim, so import followed by export gives back the same tensors, keys and
metadata bit for bit. Config comes from the keys (spec 7.6), then the file's `config` metadata for flags,
then YAML, then CLI overrides. A `config` metadata entry that is not a JSON object is refused (its flags cannot
be known) unless --ignore-metadata-config says to take them from YAML / overrides instead. Every user error
is one line on stderr and exit status 2, and leaves no output behind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict

from valle_jax.config import ConfigError, ModelConfig, load_yaml, parse_assignment
from valle_jax.fileio import atomic_write
from valle_jax.models import backbone as backbones

STATE_PREFIX_RENAMES = (("retnet.", "model."),)  # legacy RetNet checkpoints (spec 7.5)
STATE_DICT_KEYS = ("module", "lora")  # where a .pth keeps its tensors; LoRA files may say `lora` (reference-lora.md)

# (reference key regex, parameter path template, transpose?). Templates use the regex groups.
_NORM = r"(?:input_layernorm|post_attention_layernorm|norm|layer_norm|retention_layer_norm|ffn_layernorm|final_layer_norm)"
NAME_RULES: list[tuple[str, str, bool]] = [
    (r"(sep|dropout_token)", r"\1", False),
    (r"(text_emb|rvq_l_emb|langs_emb|tasks_emb|tones_emb)\.weight", r"\1/embedding", False),
    (r"(proms_emb|resps_emb)\.embeddings\.(\d+)\.weight", r"\1/embeddings_\2/embedding", False),
    (r"model\.embed_tokens\.weight", r"model/embed_tokens", False),
    (r"model\.retnet_rel_pos\.(angle|decay)", r"model/retnet_rel_pos/\1", False),
    (rf"model\.(layers\.\d+\.)?((?:\w+\.)?{_NORM})\.weight", r"model/\1\2/scale", False),
    (rf"model\.(layers\.\d+\.)?((?:\w+\.)?{_NORM})\.bias", r"model/\1\2/bias", False),
    (r"model\.layers\.(\d+)\.(\w+)\.(\w+)\.weight", r"model/layers_\1/\2/\3/kernel", True),
    (r"model\.layers\.(\d+)\.(\w+)\.(\w+)\.bias", r"model/layers_\1/\2/\3/bias", False),
    (r"classifier\.weight", r"classifier/kernel", True),
    (r"classifier\.bias", r"classifier/bias", False),
    (r"classifiers\.proj\.(\d+)\.weight", r"classifiers/proj_\1/kernel", True),
    (r"classifiers\.proj\.(\d+)\.bias", r"classifiers/proj_\1/bias", False),
]
_COMPILED = [(re.compile(p + r"\Z"), t, tr) for p, t, tr in NAME_RULES]

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SFT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64,
               "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}  # fmt: skip
_SFT_NAMES = {np.dtype(v): k for k, v in _SFT_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file cannot be converted; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------------------
# names


def param_path(key: str) -> tuple[tuple[str, ...], bool]:
    """Reference key -> (parameter path, transpose?). Raises KeyError for a key no rule knows."""
    for rx, template, transpose in _COMPILED:
        m = rx.match(key)
        if m:
            path = m.expand(template).replace("layers.", "layers_").rstrip(".").replace("./", "/").replace(".", "/")
            return tuple(p for p in path.split("/") if p), transpose
    raise KeyError(key)


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------------------
# containers


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"safetensors header names {k!r} twice")
        out[k] = v
    return out


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Our own reader (numpy has no bfloat16 for the stock one); checks the file is whole and its header sound.

    The layout rules are the safetensors library's own: every tensor's `data_offsets` [begin, end] are
    non-negative integers with begin <= end, end - begin is exactly the bytes of its dtype and shape, and the
    tensors, taken in offset order, tile the data section from byte 0 to its last byte without overlap or gap.
    """
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a checkpoint (too short for a safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if data[8:9] != b"{" or n > 1 << 30:
        raise CheckpointError(f"{path}: not a checkpoint (no safetensors header)")
    if n > len(data) - 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file {len(data)})")
    try:
        header = json.loads(data[8 : 8 + n], object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a checkpoint (unreadable safetensors header: {e})") from e
    except CheckpointError as e:
        raise CheckpointError(f"{path}: not a checkpoint ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a checkpoint (safetensors header is not a mapping)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: malformed safetensors header: '__metadata__' must map names to strings")
    body = memoryview(data)[8 + n :]
    layout = []  # (begin, end, key, dtype, shape)
    for key, info in header.items():
        try:
            dtype = _SFT_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {key!r}: malformed header entry {info!r}") from e
        if not (_is_count(begin) and _is_count(end) and begin <= end):
            raise CheckpointError(f"{path}: tensor {key!r}: data_offsets {[begin, end]} are not 0 <= begin <= end")
        if not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{path}: tensor {key!r}: shape {list(shape)} is not a list of sizes >= 0")
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {key!r}: {end - begin} bytes do not hold shape {list(shape)} "
                                  f"of {info['dtype']} ({nbytes} bytes)")  # fmt: skip
        layout.append((begin, end, key, dtype, shape))
    layout.sort(key=lambda t: (t[0], t[1]))
    covered = 0
    for begin, end, key, _, _ in layout:
        if begin != covered:
            what = "overlaps the tensor before it" if begin < covered else f"leaves bytes {covered}..{begin} unused"
            raise CheckpointError(f"{path}: tensor {key!r}: data_offsets {[begin, end]} {what} (not a sound safetensors layout)")
        covered = end
    if covered > len(body):
        key = layout[-1][2]
        raise CheckpointError(f"{path}: truncated: tensor {key!r} ends at byte {covered}, data has {len(body)}")
    if covered < len(body):
        raise CheckpointError(f"{path}: {len(body) - covered} bytes after the last tensor (not a sound safetensors layout)")
    tensors = {}  # in the header's order, which export keeps
    for begin, end, key, dtype, shape in layout:
        tensors[key] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
    return {k: tensors[k] for k in header}, dict(meta)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, arr in tensors.items():
        nbytes = arr.nbytes
        header[key] = {"dtype": _SFT_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    atomic_write(path, lambda f: [f.write(struct.pack("<Q", len(raw))), f.write(raw)]
                  + [f.write(np.ascontiguousarray(a).tobytes()) for a in tensors.values()])  # fmt: skip


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def read_pth(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`{'module': state_dict, ...}` or a bare state dict, loaded without running arbitrary pickled code."""
    import pickle
    import zipfile

    import torch

    with open(path, "rb") as f:
        zip_magic = f.read(4) == b"PK\x03\x04"
    if zip_magic and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: truncated PyTorch checkpoint (the zip archive has no end record)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        short = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint or truncated ({short})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (top level is {type(obj).__name__}, expected a dict)")
    state_key = next((k for k in STATE_DICT_KEYS if k in obj), None)
    state = obj[state_key] if state_key else obj
    extra = {k: v for k, v in obj.items() if k != state_key} if state_key else {}
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: 'module' is not a state dict")
    tensors = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: key {k!r} is a {type(v).__name__}, not a tensor")
        tensors[k] = _torch_to_numpy(v)
    for k, v in list(extra.items()):
        try:
            json.dumps(v)
        except TypeError:
            warnings.warn(f"{path}: top-level entry {k!r} is not JSON-serialisable; it is not kept", stacklevel=2)
            del extra[k]
    return tensors, extra


def write_pth(path: Path, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
    import torch

    def to_torch(a: np.ndarray):
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a.copy())

    obj = {"module": {k: to_torch(a) for k, a in tensors.items()}, **extra}
    atomic_write(path, lambda f: torch.save(obj, f))


def read_reference(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """(state dict with legacy prefixes renamed, metadata as Python values, container) of a reference file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a .sft/.safetensors or .pth/.pt file")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".sft", ".safetensors"):
            tensors, raw_meta = read_safetensors(path)
            meta = {}
            for k, v in raw_meta.items():
                try:
                    meta[k] = json.loads(v)
                except json.JSONDecodeError:
                    meta[k] = v  # kept verbatim; a `config` that is not JSON is refused by infer_config
            container = "sft"
        elif suffix in (".pth", ".pt"):
            tensors, meta = read_pth(path)
            container = "pth"
        else:
            raise CheckpointError(f"{path}: not a checkpoint (expected a .sft/.safetensors or .pth/.pt file)")
    except OSError as e:  # unreadable (permissions, I/O error)
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    renamed = {}
    for k, v in tensors.items():
        for old, new in STATE_PREFIX_RENAMES:
            if k.startswith(old):
                k = new + k[len(old) :]
        renamed[k] = v
    return renamed, meta, container


# ---------------------------------------------------------------------------------------------------------
# config inference (spec 7.6)


IGNORE_METADATA_CONFIG_FLAG = "--ignore-metadata-config"


def metadata_config(meta: dict[str, Any], src: str, ignore: bool = False) -> dict | None:
    """The file's `config` metadata as a mapping, None when absent (or ignored on request).

    A `config` that is present but not a JSON object is refused: reading flags from it is impossible, and
    falling back to defaults would import a different model (sums off, causal_size 1 ...) without a word.
    So is one whose flags that change the computation have the wrong type ("causal_size": "4").
    """
    if ignore or "config" not in meta:
        return None
    value = meta["config"]
    way_on = (f"repair the file, or pass {IGNORE_METADATA_CONFIG_FLAG} and give the flags with --config X.yaml or "
              "key=value overrides (e.g. experimental.audio_embedding_sums=true experimental.causal_size=4)")  # fmt: skip
    if not isinstance(value, dict):
        shown = value if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise CheckpointError(f"{src}: metadata 'config' is not a JSON object ({shown!r}), so the model's flags "
                              f"cannot be read from it; {way_on}")  # fmt: skip
    exp = {} if value.get("experimental") is None else value["experimental"]
    if not isinstance(exp, dict):
        raise CheckpointError(f"{src}: metadata 'config': experimental = {exp!r}: expected a mapping; {way_on}")
    checks = [("audio_embedding_sums", value[k], bool) for k in ("audio_embedding_sums",) if k in value]  # legacy place
    checks += [(f"experimental.{k}", exp[k], bool) for k in _BOOL_FLAGS if k in exp]
    checks += [(f"experimental.{k}", exp[k], int) for k in _INT_FLAGS if k in exp]
    for name, v, kind in checks:
        if not (isinstance(v, bool) if kind is bool else isinstance(v, int) and not isinstance(v, bool)):
            want = "true or false" if kind is bool else "a whole number"
            raise CheckpointError(f"{src}: metadata 'config': {name} = {v!r}: expected {want}; {way_on}")
    return value


# The flags that change what the model computes (the rest are shapes, read from the keys, or unused here).
_BOOL_FLAGS = ("audio_embedding_sums", "split_classifiers", "unified_position_ids")
_INT_FLAGS = ("causal_size", "kv_heads")


def infer_config(tensors: dict[str, np.ndarray], meta: dict[str, Any], path: Path, heads: int | None = None,
                 ignore_metadata_config: bool = False) -> ModelConfig:  # fmt: skip
    """A new config: shapes and the backbone from the keys, flags from the metadata `config`, heads from the caller,
    then our own export's `userdata`, then dim / 64 (every release)."""
    src = str(path)
    if "text_emb.weight" not in tensors:
        raise CheckpointError(f"{src}: missing key 'text_emb.weight' (not a VALL-E checkpoint?)")
    if any(re.match(r"(proms|resps)_emb\.weight\.\d+$", k) for k in tensors):
        raise CheckpointError(f"{src}: version 4 checkpoint (per-level scalar weights 'proms_emb.weight.N'); unsupported")
    meta_cfg = metadata_config(meta, src, ignore_metadata_config)
    if meta_cfg is None:
        why = "its 'config' metadata is ignored as asked" if ignore_metadata_config else "no 'config' metadata"
        warnings.warn(f"{src}: {why}; flags not given by --config or overrides fall back to the release "
                      "settings (spec 1.7)", stacklevel=2)  # fmt: skip
    meta_arch = (meta_cfg or {}).get("arch_type")
    if meta_arch is not None and meta_arch not in backbones.names():
        raise CheckpointError(f"{src}: unsupported arch_type {meta_arch!r} in metadata (supported: {', '.join(backbones.names())})")
    found = [b for b in backbones.all_backbones() if b.matches_keys is not None and b.matches_keys(tensors)]
    if len(found) != 1:
        what = "no known backbone" if not found else f"several backbones ({', '.join(b.name for b in found)})"
        raise CheckpointError(f"{src}: the 'model.layers.*' keys match {what}")
    arch = found[0]

    text_rows, d = tensors["text_emb.weight"].shape
    levels = sorted(int(m.group(1)) for k in tensors if (m := re.match(r"resps_emb\.embeddings\.(\d+)\.weight$", k)))
    if not levels:
        raise CheckpointError(f"{src}: missing key 'resps_emb.embeddings.0.weight'")
    layer_ids = [int(m.group(1)) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))]
    if not layer_ids:
        raise CheckpointError(f"{src}: missing keys 'model.layers.0.*' (no backbone)")
    version = 5 if "rvq_l_emb.weight" in tensors else 3 if "langs_emb.weight" in tensors or "tasks_emb.weight" in tensors else 2
    if meta_cfg and meta_cfg.get("version", version) != version:
        warnings.warn(f"{src}: metadata says version {meta_cfg.get('version')}, keys say {version}; using {version}", stacklevel=2)
    userdata = meta.get("userdata") if isinstance(meta.get("userdata"), dict) else {}
    heads = heads or (userdata.get("valle_jax") or {}).get("heads")
    if heads is None:
        if d % 64:
            raise CheckpointError(f"{src}: dim {d} is not a multiple of 64; give the number of heads (heads=N)")
        heads = d // 64  # every release: head_dim 64 (spec 7.6)

    fields: dict[str, Any] = {
        "arch_type": arch.name, "version": version, "dim": int(d), "text_tokens": int(text_rows),
        "resp_levels": levels[-1] + 1, "layers": max(layer_ids) + 1, "heads": int(heads),
        "embed_tokens": "model.embed_tokens.weight" in tensors, "dropout_token": "dropout_token" in tensors,
    }  # fmt: skip
    for table, name in (("tasks_emb.weight", "tasks"), ("langs_emb.weight", "langs"), ("tones_emb.weight", "tones")):
        fields[name] = int(tensors[table].shape[0]) if table in tensors else 0
    split = any(k.startswith("classifiers.proj.") for k in tensors)
    experimental: dict[str, Any] = {"split_classifiers": split}
    if meta_cfg is None:  # spec 1.7 fallbacks
        fields["capabilities"] = ["ar"] if fields["resp_levels"] == 1 else ["ar", "nar"]
    if arch.config_from_keys is not None:
        for key, value in arch.config_from_keys(tensors, {**fields, "split_classifiers": split}, meta_cfg is not None).items():
            (experimental if key.startswith("experimental.") else fields)[key.removeprefix("experimental.")] = value
    data = ModelConfig.clean_reference(meta_cfg or {})
    data.update(fields)
    data["experimental"] = {**data["experimental"], **experimental}
    try:
        return ModelConfig.from_dict(data, strict=False, where=f"{src}: metadata config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------
# state dict <-> params


def state_to_params(tensors: dict[str, np.ndarray], cfg: ModelConfig, src: str) -> dict:
    """Map every tensor into the parameter tree of `cfg`, checking names and shapes; dtype is kept."""
    import jax

    from valle_jax.models.valle import init_params

    expected = flatten_dict(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    params: dict = {}
    seen = set()
    for key, arr in tensors.items():
        try:
            path, transpose = param_path(key)
        except KeyError:
            raise CheckpointError(f"{src}: unknown key {key!r} (no parameter of a {cfg.arch_type} v{cfg.version} model)") from None
        if path not in expected:
            raise CheckpointError(f"{src}: unknown key {key!r} (no parameter {'/'.join(path)} in this model layout)")
        value = arr.T if transpose else arr
        want = tuple(expected[path].shape)
        if tuple(value.shape) != want:
            shown = list(arr.shape)
            want_ref = list(want[::-1]) if transpose else list(want)
            raise CheckpointError(f"{src}: key {key!r} has shape {shown}, expected {want_ref}")
        _set(params, path, np.ascontiguousarray(value))
        seen.add(path)
    missing = [p for p in expected if p not in seen]
    if missing:
        names = [params_key(p) for p in missing]
        raise CheckpointError(f"{src}: missing key(s) {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    return params


_LEAF_TO_REF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def params_key(path: tuple[str, ...]) -> str:
    """Parameter path -> reference key (the inverse of NAME_RULES)."""
    if path == ("model", "embed_tokens"):
        return "model.embed_tokens.weight"
    *modules, leaf = path
    modules = [re.sub(r"^(layers|embeddings|proj)_(\d+)$", r"\1.\2", m) for m in modules]
    if modules and leaf in _LEAF_TO_REF:
        leaf = _LEAF_TO_REF[leaf]
    return ".".join(modules + [leaf])


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16


def params_to_state(params: dict, key_order: list[str] | None = None, dtype: Any = None) -> dict[str, np.ndarray]:
    flat = flatten_dict(params)
    state = {}
    for path, value in flat.items():
        key = params_key(path)
        _, transpose = param_path(key)
        arr = np.asarray(value)
        arr = arr.T if transpose else arr
        if dtype is not None and _is_float(arr):
            arr = arr.astype(dtype)
        state[key] = np.ascontiguousarray(arr)
    if key_order:
        ordered = {k: state[k] for k in key_order if k in state}
        ordered.update({k: v for k, v in state.items() if k not in ordered})
        state = ordered
    return state


# ---------------------------------------------------------------------------------------------------------
# public API


def load_reference(path: str | Path, overrides: list[str] | dict | None = None, config: str | Path | None = None,
                   heads: int | None = None, ignore_metadata_config: bool = False) -> tuple[ModelConfig, dict, dict]:  # fmt: skip
    """Read a reference .sft/.pth -> (config, params in the file's dtypes, reference metadata for export).

    `ignore_metadata_config`: do not read flags from the file's `config` metadata (for a file whose metadata
    is damaged); they come from `config` / `overrides`, else the release settings.
    """
    path = Path(path)
    overrides = dict(overrides) if isinstance(overrides, dict) else dict(parse_assignment(a) for a in overrides or [])
    heads = heads if heads is not None else overrides.pop("heads", None)
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise CheckpointError(f"{path}: heads = {heads!r}: expected a whole number >= 1")
    tensors, meta, container = read_reference(path)
    cfg = infer_config(tensors, meta, path, heads, ignore_metadata_config)
    if config is not None:
        yaml_cfg = load_yaml(config).to_dict()
        base = cfg.to_dict()
        for key in ("dim", "layers", "ffn", "resp_levels", "text_tokens", "tasks", "langs", "tones", "embed_tokens", "dropout_token"):
            yaml_cfg[key] = base[key]  # shapes always come from the checkpoint
        for key in ("split_classifiers", "kv_heads"):
            yaml_cfg["experimental"][key] = base["experimental"][key]
        if heads is not None or yaml_cfg.get("heads") is None:  # --heads wins; a YAML `size` preset does not
            yaml_cfg["heads"] = base["heads"]
        try:
            cfg = ModelConfig.from_dict(yaml_cfg)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from e
    if overrides:
        try:
            cfg = cfg.override(overrides)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from e
    params = state_to_params(tensors, cfg, str(path))
    reference = {"container": container, "keys": list(tensors), "metadata": _raw_metadata(path, meta, container),
                 "dtypes": sorted({str(a.dtype) for a in tensors.values()})}  # fmt: skip
    return cfg, params, reference


def load_any(path: str | Path, heads: int | None = None, overrides: list[str] | dict | None = None,
             dtype: Any = np.float32, ignore_metadata_config: bool = False) -> tuple[ModelConfig, dict]:  # fmt: skip
    """A reference .sft/.pth or a valle_jax model directory -> (config, params cast to `dtype`)."""
    path = Path(path)
    if path.is_dir():
        from valle_jax.checkpoint import load_model_dir

        cfg, params, _ = load_model_dir(path)
        if overrides:
            cfg = cfg.override(overrides)
    else:
        cfg, params, _ = load_reference(path, overrides, heads=heads, ignore_metadata_config=ignore_metadata_config)
    from valle_jax.checkpoint import cast_tree

    return cfg, cast_tree(params, dtype)


def _raw_metadata(path: Path, meta: dict, container: str) -> dict:
    if container == "sft":
        return read_safetensors_metadata(path)
    return meta


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {}) or {}


def check_destination(dst: str | Path, force: bool, is_dir: bool) -> None:
    """Refuse, before any work, a destination that exists (unless `force`), has the wrong kind (file or
    directory), or cannot be created (a parent that is a file, a folder without write permission)."""
    dst = Path(dst)
    want = "a model directory" if is_dir else "a file"
    if dst.exists() or dst.is_symlink():
        if dst.is_dir() != is_dir:
            raise CheckpointError(f"{dst}: exists and is {'a directory' if dst.is_dir() else 'a file'}, not {want}")
        if not force:
            raise CheckpointError(f"{dst}: already exists (use --force to replace it)")
        from valle_jax.checkpoint import CONFIG_FILE

        if is_dir and any(dst.iterdir()) and not (dst / CONFIG_FILE).is_file():
            raise CheckpointError(f"{dst}: exists and is not a valle_jax model directory; not replacing it, even with --force")
    parent = dst.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"{dst}: cannot be written: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{dst}: cannot be written: no write permission in {parent}")


def output_container(path: Path, dtype: str | None = None) -> str:
    """"sft" or "pth" from a destination's suffix (and a valid export dtype), or a clear refusal."""
    container = {".sft": "sft", ".safetensors": "sft", ".pth": "pth", ".pt": "pth"}.get(path.suffix.lower())
    if container is None:
        raise CheckpointError(f"{path}: unknown output container (expected .sft or .pth)")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return container


def export_reference(src_dir: str | Path, dst: str | Path, dtype: str | None = None, force: bool = False) -> Path:
    """Model directory -> reference .sft or .pth, with the keys, shapes and metadata the reference loads.
    An existing `dst` is refused unless `force`; the file appears whole or not at all."""
    from valle_jax.checkpoint import load_model_dir

    dst = Path(dst)
    container = output_container(dst, dtype)
    check_destination(dst, force, is_dir=False)
    try:
        cfg, params, reference = load_model_dir(src_dir)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # orbax on a damaged params/ folder, unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{src_dir}: not a readable valle_jax model directory ({first})") from None
    state = params_to_state(params, reference.get("keys"), DTYPES[dtype] if dtype else None)
    metadata = _usable_config(dict(reference.get("metadata") or {}), cfg, reference.get("container"), src_dir)
    same_container = reference.get("container") == container
    if container == "sft":
        if not (same_container and metadata):
            metadata = {k: json.dumps(v) for k, v in _default_metadata(cfg, metadata).items()}
        write_safetensors(dst, state, metadata)
    else:
        if not same_container:
            metadata = _default_metadata(cfg, metadata)
        write_pth(dst, state, metadata)
    return dst


def _usable_config(metadata: dict, cfg: ModelConfig, container: str | None, src: str | Path) -> dict:
    """The imported file's metadata, kept verbatim unless its `config` was not a JSON object (imported with
    --ignore-metadata-config): that one is replaced by the flags the model was given, so the export loads."""
    if "config" not in metadata:
        return metadata
    value = metadata["config"]
    if container == "sft" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, dict):
        return metadata
    warnings.warn(f"{src}: the imported 'config' metadata was not a JSON object; the export writes this model's "
                  "config instead", stacklevel=3)  # fmt: skip
    flags = cfg.reference_dict()
    return dict(metadata, config=json.dumps(flags) if container == "sft" else flags)


def _default_metadata(cfg: ModelConfig, previous: dict) -> dict:
    """Metadata as the reference's export writes it; values carried over from the other container when known."""
    decoded = {}
    for k, v in previous.items():
        try:
            decoded[k] = json.loads(v) if isinstance(v, str) else v
        except json.JSONDecodeError:
            decoded[k] = v
    # heads cannot be read from weights: files we write from scratch say them in userdata
    userdata = decoded.get("userdata", {"valle_jax": {"heads": cfg.n_heads}})
    return {"stats": decoded.get("stats", {"global_step": 0}), "userdata": userdata,
            "config": decoded.get("config", cfg.reference_dict())}  # fmt: skip


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _drop_closed_loop_noise(unraisable) -> None:
    """After orbax fails to restore a damaged folder, tensorstore callbacks still post to its closed asyncio
    loop; each prints an "Event loop is closed" traceback under the one-line error. Those alone are dropped."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
        return
    sys.__unraisablehook__(unraisable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m valle_jax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="reference .sft/.pth -> valle_jax model directory")
    imp.add_argument("src")
    imp.add_argument("dst")
    imp.add_argument("--config", help="YAML whose flags override the checkpoint's metadata (shapes still from keys)")
    imp.add_argument("--heads", type=int, help="attention heads (cannot be read from weights; default dim/64)")
    imp.add_argument("--force", action="store_true", help="replace DST if it exists")
    imp.add_argument(IGNORE_METADATA_CONFIG_FLAG, action="store_true",
                     help="do not read the model's flags from the file's `config` metadata (a file whose metadata is "
                          "damaged is refused otherwise); give them with --config / key=value overrides, else "
                          "the release settings apply")  # fmt: skip
    imp.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. experimental.audio_embedding_sums=true")
    exp = sub.add_parser("export", help="valle_jax model directory -> reference .sft/.pth")
    exp.add_argument("src")
    exp.add_argument("dst")
    exp.add_argument("--dtype", choices=list(DTYPES), help="tensor dtype (default: as imported / as stored)")
    exp.add_argument("--force", action="store_true", help="replace DST if it exists")
    mrg = sub.add_parser("merge", help="fold a reference LoRA file into a base model -> valle_jax model directory")
    mrg.add_argument("base", help="valle_jax model directory or reference .sft/.pth")
    mrg.add_argument("lora", help="reference LoRA file (.sft/.pth)")
    mrg.add_argument("dst")
    mrg.add_argument("--heads", type=int, help="attention heads of a reference BASE file (default dim/64)")
    mrg.add_argument("--all-levels", action="store_true", help="merge a LoRA restricted to some RVQ levels anyway")
    mrg.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's warnings would bury the one-line error
    sys.unraisablehook = _drop_closed_loop_noise  # for the rest of the process: the noise comes at exit too
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            if args.cmd == "import":
                from valle_jax.checkpoint import save_model_dir

                check_destination(args.dst, args.force, is_dir=True)
                cfg, params, reference = load_reference(args.src, args.overrides, args.config, args.heads,
                                                        ignore_metadata_config=args.ignore_metadata_config)  # fmt: skip
                out = save_model_dir(args.dst, cfg, params, reference, force=args.force)
                n = sum(int(np.prod(np.shape(a))) for a in flatten_dict(params).values())
                print(f"imported {args.src} -> {out}: {cfg.arch_type} v{cfg.version}, {cfg.n_layers} layers, dim {cfg.d_model}, "
                      f"{cfg.n_heads} heads, {cfg.resp_levels} levels, {n:,} parameters")  # fmt: skip
            elif args.cmd == "merge":
                from valle_jax.lora_files import merge_files

                check_destination(args.dst, args.force, is_dir=True)
                out = merge_files(args.base, args.lora, args.dst, args.heads, args.all_levels, args.force)
                print(f"merged {args.lora} into {args.base} -> {out}")
            else:
                out = export_reference(args.src, args.dst, args.dtype, force=args.force)
                print(f"exported {args.src} -> {out}")
    except (CheckpointError, ConfigError, FileExistsError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # writing failed half-way (disk full, I/O error): the writers removed their temporaries
        print(f"error: {args.dst}: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
