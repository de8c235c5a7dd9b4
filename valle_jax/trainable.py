"""What a training run updates, and what it leaves frozen (issue 13).

Three cases, one rule: only trained leaves get gradients and optimizer state.
- Full training: every parameter trains.
- Full training with `model.frozen_params`: the reference's list of parameter names (exact state-dict names,
  e.g. `classifiers.proj.0.weight`, `model.layers.0.mlp.up_proj.weight`; the reference freezes a parameter when
  its name is in the list) is frozen: no gradient (stop_gradient) and no optimizer moments (optax masking).
- LoRA (`train.lora`): the train state holds only the LoRA's params (and, with `embeddings: true`, the
  `*_emb` tables, as the reference's `freeze_non_lora_weights`); the base model is an input of the step, never
  updated or checkpointed: checkpoints carry a pointer to it instead (`base_pointer`: path and content hash).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from valle_jax.config import ConfigError, ModelConfig
from valle_jax.fileio import sha256_file

Path_ = tuple[str, ...]
LORA, EMBEDDINGS = "lora", "embeddings"  # the keys of a LoRA run's trainable tree


def reference_names(params_shapes: dict) -> dict[Path_, str]:
    """Parameter path -> the reference's state-dict name (convert.params_key)."""
    from valle_jax.convert import params_key

    return {path: params_key(path) for path in flatten_dict(params_shapes)}


def trains_mask(mcfg: ModelConfig, params_shapes: dict) -> dict | None:
    """Full training: a bool tree, False for the parameters `model.frozen_params` names; None when none is frozen.
    A name that is no parameter of this model is refused (the reference would silently ignore a typo)."""
    frozen = tuple(mcfg.frozen_params)
    if not frozen:
        return None
    names = reference_names(params_shapes)
    unknown = sorted(set(frozen) - set(names.values()))
    if unknown:
        shown = ", ".join(sorted(names.values())[:6])
        raise ConfigError(f"model.frozen_params: {', '.join(map(repr, unknown))} is no parameter of this model "
                          f"(expected reference state-dict names, e.g. {shown}, ...)")  # fmt: skip
    return unflatten_dict({path: name not in frozen for path, name in names.items()})


def masked_optimizer(tx: optax.GradientTransformation, mask: dict | None) -> optax.GradientTransformation:
    """`tx` on the leaves where `mask` is True; the others get zero updates and no optimizer state."""
    if mask is None:
        return tx
    labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def freeze(params: dict, mask: dict | None) -> dict:
    """The params with the frozen leaves behind stop_gradient (no gradient is computed for them)."""
    if mask is None:
        return params
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)


def embedding_paths(params_shapes: dict) -> list[Path_]:
    """The `*_emb` tables (reference names containing `_emb`), which `train.lora.embeddings` trains."""
    return [path for path, name in reference_names(params_shapes).items() if "_emb" in name]


def subtree(params: dict, paths: list[Path_]) -> dict:
    flat = flatten_dict(params)
    return unflatten_dict({p: flat[p] for p in paths})


def overlay(base: dict, part: dict | None) -> dict:
    """`base` with the leaves of `part` (a subtree of the same paths) in their place."""
    if not part:
        return base
    flat = flatten_dict(base)
    flat.update(flatten_dict(part))
    return unflatten_dict(flat)


def count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def nbytes(tree: Any) -> int:
    """Bytes of a tree's leaves (arrays or ShapeDtypeStructs)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------------------
# the base of a LoRA run


def content_hash(path: str | Path) -> str:
    """sha256 of a checkpoint file, or of a model directory (its files' relative names and bytes, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    if not path.is_dir():
        return sha256_file(path)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def base_pointer(path: str | Path) -> dict:
    """What a LoRA run's checkpoints record about their base: absolute path and content hash."""
    return {"path": str(Path(path).absolute()), "sha256": content_hash(path)}


def check_base(saved: dict, current: dict, run_dir: Path) -> None:
    """Refuse a resume of a LoRA run against another base than it was trained on."""
    if saved.get("sha256") != current["sha256"]:
        raise ConfigError(
            f"{run_dir}: this LoRA run was trained on the base {saved.get('path')!r} (sha256 {str(saved.get('sha256'))[:16]}...), "
            f"but train.init_from = {current['path']!r} has sha256 {current['sha256'][:16]}...: a LoRA only fits the base it "
            "was trained on. Point train.init_from at that base, or start over (train.restart=true or another train.run_dir)."
        )  # fmt: skip
