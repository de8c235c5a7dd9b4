"""Reference checkpoints (.sft / .pth) <-> valle_jax model directories, losslessly.

    python -m valle_jax.convert import SRC.(sft|pth) DST_DIR [--config X.yaml] [key=value ...]
    python -m valle_jax.convert export SRC_DIR DST.(sft|pth) [--dtype bfloat16|float16|float32]
    python -m valle_jax.convert merge BASE(DIR|.sft|.pth) LORA.(sft|pth) DST_DIR [--heads N] [--all-levels]

One table (`NAME_RULES`) maps reference state-dict keys to parameter paths; Linear weights are [out, in] in
PyTorch and transposed for Dense kernels. Every tensor of the file is kept, used or not, with its dtype, and
the file's metadata is kept verbatim, so import followed by export gives back the same tensors, keys and
metadata bit for bit. Config comes from the keys (spec 7.6), then the file's `config` metadata for flags,
then YAML, then CLI overrides.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from valle_jax.config import ConfigError, ModelConfig, load_yaml
from valle_jax.fileio import atomic_write

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


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


# ---------------------------------------------------------------------------------------------------------
# containers


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Our own reader (numpy has no bfloat16 for the stock one); checks the file is whole."""
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a checkpoint (too short for a safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if data[8:9] != b"{" or n > 1 << 30:
        raise CheckpointError(f"{path}: not a checkpoint (no safetensors header)")
    if n > len(data) - 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file {len(data)})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a checkpoint (unreadable safetensors header: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a checkpoint (safetensors header is not a mapping)")
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n :]
    tensors = {}
    for key, info in header.items():
        try:
            dtype = _SFT_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {key!r}: malformed header entry {info!r}") from e
        if end > len(body):
            raise CheckpointError(f"{path}: truncated: tensor {key!r} ends at byte {end}, data has {len(body)}")
        arr = np.frombuffer(body[begin:end], dtype=dtype)
        if arr.size != int(np.prod(shape)):
            raise CheckpointError(f"{path}: tensor {key!r}: {end - begin} bytes do not hold shape {list(shape)}")
        tensors[key] = arr.reshape(shape).copy()
    return tensors, dict(meta)


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
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".sft", ".safetensors"):
        tensors, raw_meta = read_safetensors(path)
        meta = {}
        for k, v in raw_meta.items():
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v
        container = "sft"
    elif suffix in (".pth", ".pt"):
        tensors, meta = read_pth(path)
        container = "pth"
    else:
        raise CheckpointError(f"{path}: not a checkpoint (expected a .sft/.safetensors or .pth/.pt file)")
    renamed = {}
    for k, v in tensors.items():
        for old, new in STATE_PREFIX_RENAMES:
            if k.startswith(old):
                k = new + k[len(old) :]
        renamed[k] = v
    return renamed, meta, container


# ---------------------------------------------------------------------------------------------------------
# config inference (spec 7.6)


def _manifest_heads(path: Path) -> int | None:
    """Heads cannot be read from weights: a `fixtures.json` manifest beside the file may name them."""
    manifest = path.parent / "fixtures.json"
    if not manifest.is_file():
        return None
    try:
        variants = json.loads(manifest.read_text()).get("variants", {})
    except (json.JSONDecodeError, AttributeError):
        return None
    for v in variants.values():
        if isinstance(v, dict) and v.get("checkpoint") == path.name:
            return v.get("dims", {}).get("heads")
    return None


def infer_config(tensors: dict[str, np.ndarray], meta: dict[str, Any], path: Path, heads: int | None = None) -> ModelConfig:
    """Shapes from the keys, flags from the metadata `config`, heads from the caller / manifest / dim / 64."""
    src = str(path)
    if "text_emb.weight" not in tensors:
        raise CheckpointError(f"{src}: missing key 'text_emb.weight' (not a VALL-E checkpoint?)")
    if any(re.match(r"(proms|resps)_emb\.weight\.\d+$", k) for k in tensors):
        raise CheckpointError(f"{src}: version 4 checkpoint (per-level scalar weights 'proms_emb.weight.N'); unsupported")
    meta_cfg = meta.get("config") if isinstance(meta.get("config"), dict) else None
    cfg = ModelConfig.from_reference(meta_cfg, where=f"{src}: metadata config") if meta_cfg else ModelConfig()
    if meta_cfg is None:
        warnings.warn(f"{src}: no 'config' metadata; flags fall back to the release settings (spec 1.7)", stacklevel=2)

    text_rows, d = tensors["text_emb.weight"].shape
    cfg.dim, cfg.text_tokens = int(d), int(text_rows)
    levels = sorted(int(m.group(1)) for k in tensors if (m := re.match(r"resps_emb\.embeddings\.(\d+)\.weight$", k)))
    if not levels:
        raise CheckpointError(f"{src}: missing key 'resps_emb.embeddings.0.weight'")
    cfg.resp_levels = levels[-1] + 1
    layer_ids = [int(m.group(1)) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))]
    if not layer_ids:
        raise CheckpointError(f"{src}: missing keys 'model.layers.0.*' (no backbone)")
    cfg.layers = max(layer_ids) + 1
    is_retnet = any(".retention." in k for k in tensors)
    meta_arch = (meta_cfg or {}).get("arch_type")
    if meta_arch is not None and meta_arch not in ("llama", "retnet"):
        raise CheckpointError(f"{src}: unsupported arch_type {meta_arch!r} in metadata (supported: llama, retnet)")
    cfg.arch_type = "retnet" if is_retnet else "llama"
    version = 5 if "rvq_l_emb.weight" in tensors else 3 if "langs_emb.weight" in tensors or "tasks_emb.weight" in tensors else 2
    if meta_cfg and meta_cfg.get("version", version) != version:
        warnings.warn(f"{src}: metadata says version {meta_cfg.get('version')}, keys say {version}; using {version}", stacklevel=2)
    cfg.version = version
    for table, field in (("tasks_emb.weight", "tasks"), ("langs_emb.weight", "langs"), ("tones_emb.weight", "tones")):
        setattr(cfg, field, int(tensors[table].shape[0]) if table in tensors else 0)
    cfg.embed_tokens = "model.embed_tokens.weight" in tensors
    cfg.dropout_token = "dropout_token" in tensors
    cfg.experimental.split_classifiers = any(k.startswith("classifiers.proj.") for k in tensors)
    if meta_cfg is None:  # spec 1.7 fallbacks
        cfg.capabilities = ["ar"] if cfg.resp_levels == 1 else ["ar", "nar"]
        cfg.experimental.unified_position_ids = not (cfg.arch_type == "llama" and cfg.experimental.split_classifiers)
    if cfg.arch_type == "llama":
        cfg.ffn = int(tensors["model.layers.0.mlp.gate_proj.weight"].shape[0]) if "model.layers.0.mlp.gate_proj.weight" in tensors else None
    else:
        cfg.ffn = int(tensors["model.layers.0.ffn.fc1.weight"].shape[0]) if "model.layers.0.ffn.fc1.weight" in tensors else None

    userdata = meta.get("userdata") if isinstance(meta.get("userdata"), dict) else {}
    heads = heads or _manifest_heads(path) or (userdata.get("valle_jax") or {}).get("heads")
    if heads is None:
        if d % 64:
            raise CheckpointError(f"{src}: dim {d} is not a multiple of 64; give the number of heads (heads=N)")
        heads = d // 64  # every release: head_dim 64 (spec 7.6)
    cfg.heads = int(heads)
    kproj = tensors.get("model.layers.0.self_attn.k_proj.weight")
    if kproj is not None and kproj.shape[0] != d:
        cfg.experimental.kv_heads = int(kproj.shape[0]) // (d // cfg.heads)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# state dict <-> params


def state_to_params(tensors: dict[str, np.ndarray], cfg: ModelConfig, src: str) -> dict:
    """Map every tensor into the parameter tree of `cfg`, checking names and shapes; dtype is kept."""
    import jax

    from valle_jax.models.valle import init_params

    expected = _flatten(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
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
    flat = _flatten(params)
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
                   heads: int | None = None) -> tuple[ModelConfig, dict, dict]:  # fmt: skip
    """Read a reference .sft/.pth -> (config, params in the file's dtypes, reference metadata for export)."""
    path = Path(path)
    tensors, meta, container = read_reference(path)
    overrides = dict(overrides) if isinstance(overrides, dict) else {k: v for k, v in (_kv(a) for a in overrides or [])}
    heads = heads or overrides.pop("heads", None)
    cfg = infer_config(tensors, meta, path, heads)
    if config is not None:
        yaml_cfg = load_yaml(config).to_dict()
        base = cfg.to_dict()
        for key in ("dim", "layers", "ffn", "resp_levels", "text_tokens", "tasks", "langs", "tones", "embed_tokens", "dropout_token"):
            yaml_cfg[key] = base[key]  # shapes always come from the checkpoint
        yaml_cfg["experimental"]["split_classifiers"] = base["experimental"]["split_classifiers"]
        cfg = ModelConfig.from_dict(yaml_cfg)
    if overrides:
        cfg = cfg.override(overrides)
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    params = state_to_params(tensors, cfg, str(path))
    reference = {"container": container, "keys": list(tensors), "metadata": _raw_metadata(path, meta, container),
                 "dtypes": sorted({str(a.dtype) for a in tensors.values()})}  # fmt: skip
    return cfg, params, reference


def load_any(path: str | Path, heads: int | None = None, overrides: list[str] | dict | None = None,
             dtype: Any = np.float32) -> tuple[ModelConfig, dict]:  # fmt: skip
    """A reference .sft/.pth or a valle_jax model directory -> (config, params cast to `dtype`)."""
    path = Path(path)
    if path.is_dir():
        from valle_jax.checkpoint import load_model_dir

        cfg, params, _ = load_model_dir(path)
        if overrides:
            cfg = cfg.override(overrides).validate()
    else:
        cfg, params, _ = load_reference(path, overrides, heads=heads)
    return cfg, {k: v for k, v in _cast_tree(params, dtype).items()}


def _cast_tree(tree: dict, dtype: Any) -> dict:
    return {k: _cast_tree(v, dtype) if isinstance(v, dict) else np.asarray(v).astype(dtype) for k, v in tree.items()}


def _raw_metadata(path: Path, meta: dict, container: str) -> dict:
    if container == "sft":
        return read_safetensors_metadata(path)
    return meta


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {}) or {}


def _kv(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def export_reference(src_dir: str | Path, dst: str | Path, dtype: str | None = None) -> Path:
    """Model directory -> reference .sft or .pth, with the keys, shapes and metadata the reference loads."""
    from valle_jax.checkpoint import load_model_dir

    dst = Path(dst)
    container = {".sft": "sft", ".safetensors": "sft", ".pth": "pth", ".pt": "pth"}.get(dst.suffix.lower())
    if container is None:
        raise CheckpointError(f"{dst}: unknown output container (expected .sft or .pth)")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cfg, params, reference = load_model_dir(src_dir)
    state = params_to_state(params, reference.get("keys"), DTYPES[dtype] if dtype else None)
    metadata = dict(reference.get("metadata") or {})
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m valle_jax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="reference .sft/.pth -> valle_jax model directory")
    imp.add_argument("src")
    imp.add_argument("dst")
    imp.add_argument("--config", help="YAML whose flags override the checkpoint's metadata (shapes still from keys)")
    imp.add_argument("--heads", type=int, help="attention heads (cannot be read from weights; default dim/64)")
    imp.add_argument("--force", action="store_true", help="replace DST if it exists")
    imp.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. experimental.audio_embedding_sums=true")
    exp = sub.add_parser("export", help="valle_jax model directory -> reference .sft/.pth")
    exp.add_argument("src")
    exp.add_argument("dst")
    exp.add_argument("--dtype", choices=list(DTYPES), help="tensor dtype (default: as imported / as stored)")
    mrg = sub.add_parser("merge", help="fold a reference LoRA file into a base model -> valle_jax model directory")
    mrg.add_argument("base", help="valle_jax model directory or reference .sft/.pth")
    mrg.add_argument("lora", help="reference LoRA file (.sft/.pth)")
    mrg.add_argument("dst")
    mrg.add_argument("--heads", type=int, help="attention heads of a reference BASE file (default dim/64)")
    mrg.add_argument("--all-levels", action="store_true", help="merge a LoRA restricted to some RVQ levels anyway")
    mrg.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "import":
            from valle_jax.checkpoint import save_model_dir

            cfg, params, reference = load_reference(args.src, args.overrides, args.config, args.heads)
            out = save_model_dir(args.dst, cfg, params, reference, force=args.force)
            n = sum(int(np.prod(np.shape(a))) for a in _flatten(params).values())
            print(f"imported {args.src} -> {out}: {cfg.arch_type} v{cfg.version}, {cfg.n_layers} layers, dim {cfg.d_model}, "
                  f"{cfg.n_heads} heads, {cfg.resp_levels} levels, {n:,} parameters")  # fmt: skip
        elif args.cmd == "merge":
            from valle_jax.lora_files import merge_files

            out = merge_files(args.base, args.lora, args.dst, args.heads, args.all_levels, args.force)
            print(f"merged {args.lora} into {args.base} -> {out}")
        else:
            out = export_reference(args.src, args.dst, args.dtype)
            print(f"exported {args.src} -> {out}")
    except (CheckpointError, ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
