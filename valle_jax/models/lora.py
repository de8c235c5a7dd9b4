"""LoRA adapters over a backbone's projections (spec reference-lora.md), pure functional, several per batch.

A targeted projection y = x W + b becomes y + (alpha / rank) * (dropout(x) A) B, with A [in, rank] and
B [rank, out] (the reference's `lora_A` [rank, in] / `lora_B` [out, rank], transposed like Dense kernels).
The base params stay one tree and a LoRA's params another, mirroring the base tree's module paths:

    {"model": {"layers_0": {"self_attn": {"q_proj": {"lora_A": [in, r], "lora_B": [r, out]}, ...}, ...}}}

No model file knows about LoRA: `lora_context` intercepts the `nn.Dense` calls of a `model.apply` and adds
the LoRA term to every Dense whose module path has an adapter. Several LoRAs serve one batch: `stack_loras`
puts them on a leading axis [n, ...] (missing targets and smaller ranks padded with zeros, which add exactly
nothing), and a per-item index [B] (-1 = no LoRA) says which one each item uses; a LoRA restricted to some
RVQ levels (`rvq_levels`) is switched on per item by that item's target level (inference only, as the
reference: training ignores it).

Shapes: B batch items, n stacked LoRAs, r rank, L RVQ levels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import flax.linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict
import jax
import jax.numpy as jnp

from valle_jax.models import backbone as backbones

Array = jax.Array
Path = tuple[str, ...]

# Which backbone projections get a LoRA, as the reference chooses them: each backbone's `lora_targets` in the
# registry (models/backbone.py), (include, exclude) substrings of the reference module name (e.g.
# "model.layers.0.self_attn.q_proj"); exclude wins. Only Dense layers of the backbone (`model`) are candidates.
BACKBONE = "model"  # the backbone's sub-tree in the params (the reference's `model.` sub-module)
LORA_A, LORA_B = "lora_A", "lora_B"
ONEHOT_MAX_LORAS = 4  # up to this many stacked LoRAs: every item runs all of them, masked (no weight gather)


class LoraError(ValueError):
    """A LoRA does not fit its model or its config is invalid; the message names the field or module."""


@dataclass(frozen=True)
class LoraConfig:
    """The reference's `loras:` entry (same names and defaults, spec "Config") plus `dropout` (the reference
    hard-codes p = 0.1 on the LoRA input in training)."""

    name: str = "lora"
    rank: int = 128
    alpha: float = 128
    training: bool = True
    embeddings: bool = False
    parametrize: bool = False
    rvq_levels: tuple[int, ...] = ()  # inference: enabled only at these target levels; empty = all
    dropout: float = 0.1

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, resp_levels: int | None = None, where: str = "lora") -> "LoraConfig":
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"{where}: rank = {self.rank!r}: expected a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise LoraError(f"{where}: alpha = {self.alpha!r}: expected a number")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise LoraError(f"{where}: dropout = {self.dropout!r}: expected 0 <= dropout < 1")
        if self.parametrize:
            raise LoraError(f"{where}: parametrize = true (the reference's parametrized LoRA) is not supported")
        for lvl in self.rvq_levels:
            if isinstance(lvl, bool) or not isinstance(lvl, int) or lvl < 0 or (resp_levels is not None and lvl >= resp_levels):
                bound = f" < {resp_levels}" if resp_levels is not None else ""
                raise LoraError(f"{where}: rvq_levels entry {lvl!r}: expected an RVQ level 0 <= level{bound}")
        return self

    def reference_dict(self) -> dict:
        """The reference's LoRA config dict (its field order; no `dropout`, which it does not have)."""
        return {"name": self.name, "rank": self.rank, "alpha": self.alpha, "training": self.training,
                "embeddings": self.embeddings, "parametrize": self.parametrize, "rvq_levels": list(self.rvq_levels)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict, where: str = "lora") -> "LoraConfig":
        if not isinstance(data, dict):
            raise LoraError(f"{where}: config is a {type(data).__name__}, expected a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:  # e.g. fields of a later reference version: they do not change the adapter's arithmetic
            warnings.warn(f"{where}: unknown LoRA config field(s) {', '.join(unknown)} ignored", stacklevel=2)
        values = {k: v for k, v in data.items() if k in known}
        if "rvq_levels" in values:
            levels = values["rvq_levels"] or []
            if not isinstance(levels, (list, tuple)):
                raise LoraError(f"{where}: rvq_levels = {levels!r}: expected a list of RVQ levels")
            values["rvq_levels"] = tuple(levels)
        return cls(**values).validate(where=where)

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------
# targets and parameters


def reference_module_name(path: Path) -> str:
    """Module path -> the reference's dotted module name: ("model", "layers_3", "mlp", "up_proj") ->
    "model.layers.3.mlp.up_proj" (the backbone's spelling in convert.params_key)."""
    return ".".join(re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path)


def is_target(arch: str, path: Path) -> bool:
    """Does the reference put a LoRA on the Dense at `path` (module path, no `kernel`) of backbone `arch`?"""
    include, exclude = backbones.get(arch).lora_targets
    if not include:
        raise LoraError(f"backbone {arch!r} names no LoRA targets (models.backbone.Backbone.lora_targets)")
    name = reference_module_name(path)
    return path[:1] == (BACKBONE,) and not any(t in name for t in exclude) and any(t in name for t in include)


def _param_shapes(cfg: Any, params: dict | None) -> dict:
    if params is not None:
        return params
    from valle_jax.models.valle import init_params

    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def lora_targets(cfg: Any, params: dict | None = None) -> dict[Path, tuple[int, int]]:
    """Module path -> (in, out) of every projection the reference puts a LoRA on, in parameter order.
    `params` (arrays or shapes) avoids building the model's shapes again."""
    out = {}
    for path, leaf in flatten_dict(_param_shapes(cfg, params)).items():
        if path[-1] == "kernel" and len(leaf.shape) == 2 and is_target(cfg.arch_type, path[:-1]):
            out[path[:-1]] = (int(leaf.shape[0]), int(leaf.shape[1]))
    return out


def init_lora(cfg: Any, lora_cfg: LoraConfig, rng: Array, params: dict | None = None, dtype: Any = jnp.float32) -> dict:
    """A fresh LoRA for `cfg`: A Kaiming-uniform (a = sqrt 5, i.e. U(+-1/sqrt(in)), as the reference), B zeros,
    so it leaves the model's output unchanged."""
    lora_cfg.validate(cfg.resp_levels)
    targets = lora_targets(cfg, params)
    keys = jax.random.split(rng, max(len(targets), 1))
    flat = {}
    for key, (path, (d_in, d_out)) in zip(keys, targets.items()):
        bound = 1.0 / math.sqrt(d_in)
        flat[path + (LORA_A,)] = jax.random.uniform(key, (d_in, lora_cfg.rank), dtype, -bound, bound)
        flat[path + (LORA_B,)] = jnp.zeros((lora_cfg.rank, d_out), dtype)
    return unflatten_dict(flat)


def adapters(lora_params: dict) -> dict[Path, tuple[Any, Any]]:
    """Module path -> (A, B) of a LoRA tree; refuses a tree with a lone A or B or another leaf name."""
    flat = flatten_dict(lora_params)
    out: dict[Path, list] = {}
    for path, leaf in flat.items():
        if path[-1] not in (LORA_A, LORA_B):
            raise LoraError(f"LoRA params: leaf {reference_module_name(path)} is neither {LORA_A} nor {LORA_B}")
        out.setdefault(path[:-1], [None, None])[path[-1] == LORA_B] = leaf
    for path, (a, b) in out.items():
        name = reference_module_name(path)
        if a is None or b is None:
            have, lack = (LORA_A, LORA_B) if a is not None else (LORA_B, LORA_A)
            raise LoraError(f"LoRA params: {name} has {have} without {lack}")
        if a.shape[-1] != b.shape[-2]:
            raise LoraError(f"LoRA params: {name}: rank of {LORA_A} {tuple(a.shape)} differs from {LORA_B} {tuple(b.shape)}")
    return {p: (a, b) for p, (a, b) in out.items()}


def check_lora(cfg: Any, lora_params: dict, params: dict | None = None, where: str = "LoRA",
               names: dict[Path, str] | None = None) -> None:  # fmt: skip
    """Every adapter sits on a target projection of `cfg` and fits its shape (missing targets are allowed:
    they carry no adapter, as in the reference's non-strict load). `names`: module names for messages."""
    targets = lora_targets(cfg, params)
    for path, (a, b) in adapters(lora_params).items():
        name = (names or {}).get(path) or reference_module_name(path)
        if path not in targets:
            known = sorted({reference_module_name(p[2:]) for p in targets})  # "self_attn.q_proj", ...
            raise LoraError(f"{where}: {name} is not a LoRA target of this {cfg.arch_type} model "
                            f"(targets: {', '.join(known)} in model.layers.0..{cfg.n_layers - 1})")  # fmt: skip
        d_in, d_out = targets[path]
        if a.shape[0] != d_in or b.shape[1] != d_out:
            raise LoraError(f"{where}: {name}: adapter maps {a.shape[0]} -> {b.shape[1]} features, the base "
                            f"projection {d_in} -> {d_out}")  # fmt: skip


def merge_lora(params: dict, lora_params: dict, lora_cfg: LoraConfig, all_levels: bool = False) -> dict:
    """Base params with the LoRA folded in: W + (alpha / rank) A B, summed in float32, stored in W's dtype.
    A LoRA restricted to some RVQ levels cannot be merged (it would apply at every level) unless `all_levels`."""
    if lora_cfg.rvq_levels and not all_levels:
        raise LoraError(f"LoRA {lora_cfg.name!r} is enabled only at RVQ levels {list(lora_cfg.rvq_levels)}; a merged model "
                        "applies it at every level (pass all_levels=True / --all-levels to merge anyway)")  # fmt: skip
    flat = flatten_dict(params)
    out = dict(flat)
    for path, (a, b) in adapters(lora_params).items():
        key = path + ("kernel",)
        if key not in flat:
            raise LoraError(f"merge: the base has no projection {reference_module_name(path)}")
        w = flat[key]
        delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision=jax.lax.Precision.HIGHEST)
        merged = jnp.asarray(w, jnp.float32) + lora_cfg.scale * delta
        out[key] = merged.astype(w.dtype)
    return unflatten_dict(out)


def lora_logical_axes(lora_params: dict, base_axes: dict) -> dict:
    """Logical axis names of a LoRA tree (for sharding): A takes its projection's input axis, B its output axis;
    the rank axis is replicated. `base_axes` is `models.valle.logical_axes(cfg)` (PartitionSpec leaves)."""
    flat_axes = flatten_dict(base_axes)
    out = {}
    for path, (a, _) in adapters(lora_params).items():
        spec = tuple(flat_axes[path + ("kernel",)])
        lead = (None,) * (a.ndim - 2)  # a stacked tree has a leading [n] axis
        out[path + (LORA_A,)] = jax.sharding.PartitionSpec(*lead, spec[0], None)
        out[path + (LORA_B,)] = jax.sharding.PartitionSpec(*lead, None, spec[1])
    return unflatten_dict(out)


# ---------------------------------------------------------------------------------------------------------
# several LoRAs in one batch


class LoraStack(NamedTuple):
    """n LoRAs on a leading axis (a pytree: pass it to jitted functions as an argument)."""

    weights: dict  # LoRA tree, leaves [n, in, r] (A) and [n, r, out] (B); zeros where a LoRA lacks a target
    scale: Array  # [n] float32 alpha / rank of each LoRA
    levels: Array  # [n, L] bool: LoRA k is enabled at target level l (inference)


def stack_loras(loras: list[tuple[LoraConfig, dict]], resp_levels: int, dtype: Any = jnp.float32) -> LoraStack:
    """Stack [(config, params), ...]: the union of their targets, ranks padded to the largest with zeros (an
    adapter that is not there, or a padded rank, contributes exactly 0). Works inside jit/grad."""
    if not loras:
        raise LoraError("stack_loras: no LoRAs given")
    per = [adapters(p) for _, p in loras]
    rank = max(c.rank for c, _ in loras)
    rank = max([rank] + [a.shape[-1] for ad in per for a, _ in ad.values()])
    paths: dict[Path, tuple[int, int]] = {}
    for ad in per:
        for path, (a, b) in ad.items():
            if path in paths and paths[path] != (a.shape[0], b.shape[1]):
                raise LoraError(f"stack_loras: {reference_module_name(path)} has different shapes in different LoRAs")
            paths[path] = (a.shape[0], b.shape[1])
    flat = {}
    for path, (d_in, d_out) in paths.items():
        As, Bs = [], []
        for ad in per:
            if path in ad:
                a, b = ad[path]
                r = a.shape[-1]
                As.append(jnp.pad(jnp.asarray(a, dtype), ((0, 0), (0, rank - r))))
                Bs.append(jnp.pad(jnp.asarray(b, dtype), ((0, rank - r), (0, 0))))
            else:
                As.append(jnp.zeros((d_in, rank), dtype))
                Bs.append(jnp.zeros((rank, d_out), dtype))
        flat[path + (LORA_A,)] = jnp.stack(As)
        flat[path + (LORA_B,)] = jnp.stack(Bs)
    scale = jnp.asarray([c.scale for c, _ in loras], jnp.float32)
    levels = jnp.asarray([[not c.rvq_levels or l in c.rvq_levels for l in range(resp_levels)] for c, _ in loras], bool)
    return LoraStack(unflatten_dict(flat), scale, levels)


def item_scale(stack: LoraStack, index_B: Array, level_B: Array | None, train: bool) -> Array:
    """[B] float32: each item's LoRA scale, 0 where it has no LoRA (-1) or its LoRA is off at its level.
    Indices must be -1 or < n (under jit an index past the stack is clamped, not refused: check on the host)."""
    index_B = jnp.asarray(index_B, jnp.int32)
    k = jnp.clip(index_B, 0, stack.scale.shape[0] - 1)
    on = index_B >= 0
    if not train:  # rvq_levels is an inference setting; the reference trains at every level
        if level_B is None:
            raise LoraError("a LoRA forward at inference needs each item's target level (level=...)")
        lvl = jnp.clip(jnp.asarray(level_B, jnp.int32), 0, stack.levels.shape[1] - 1)
        on = on & stack.levels[k, lvl]
    return jnp.where(on, stack.scale[k], 0.0)


def _lora_delta(x: Array, a: Array, b: Array, index_B: Array, scale_B: Array, strategy: str, dtype: Any) -> Array:
    """scale_b * (x_b A_{k_b}) B_{k_b} for every item b; x [B, ..., in], a [n, in, r], b [n, r, out]."""
    n = a.shape[0]
    a, b, x = a.astype(dtype), b.astype(dtype), x.astype(dtype)
    if n == 1:
        z = jnp.einsum("b...i,ir->b...r", x, a[0])
        y = jnp.einsum("b...r,ro->b...o", z, b[0])
    elif strategy == "onehot":  # every item through every LoRA, the others' rows masked to exact zeros
        hot = jax.nn.one_hot(index_B, n, dtype=dtype)  # [B, n]; all zero for index -1
        z = jnp.einsum("b...i,nir->b...nr", x, a)
        z = z * hot.reshape(hot.shape[:1] + (1,) * (z.ndim - 3) + hot.shape[1:] + (1,))
        y = jnp.einsum("b...nr,nro->b...o", z, b)
    else:  # gather each item's own adapter
        k = jnp.clip(index_B, 0, n - 1)
        z = jnp.einsum("b...i,bir->b...r", x, a[k])
        y = jnp.einsum("b...r,bro->b...o", z, b[k])
    return y * scale_B.reshape(scale_B.shape + (1,) * (y.ndim - 1)).astype(y.dtype)


@contextlib.contextmanager
def lora_context(stack: LoraStack | None, index_B: Array | None = None, level_B: Array | None = None,
                 train: bool = False, dropout: float = 0.0, rng_stream: str = "dropout",
                 strategy: str | None = None) -> Iterator[None]:  # fmt: skip
    """While active, every `model.apply` adds the stacked LoRAs to the Dense layers they target.

    `index_B` [B]: which LoRA each item uses (-1 = none; None = all use LoRA 0). `level_B` [B]: each item's
    target RVQ level (needed at inference for `rvq_levels`). `train`: rvq_levels ignored, dropout of rate
    `dropout` on the LoRA input drawn from the flax rng stream `rng_stream` (pass rngs={stream: key}).
    `strategy`: "onehot" / "gather" (default: onehot up to ONEHOT_MAX_LORAS LoRAs).

    Enter it INSIDE the traced (jitted / differentiated) function, with the stack an argument of that
    function: the adapters are read while tracing, so a context around a call of an already compiled function
    would be ignored, and arrays closed over from outside would be baked in as constants.
    """
    if stack is None:
        yield
        return
    flat = adapters(stack.weights)
    n = stack.scale.shape[0]
    strategy = strategy or ("onehot" if n <= ONEHOT_MAX_LORAS else "gather")
    if strategy not in ("onehot", "gather"):
        raise LoraError(f"LoRA strategy {strategy!r}: expected 'onehot' or 'gather'")
    # Per-item scales are computed here, in the caller's trace: computing them inside an intercepted call could
    # leave tracers of an inner trace (a remat'd layer) behind for the next layer.
    fixed = None
    if index_B is not None:
        idx = jnp.asarray(index_B, jnp.int32)
        fixed = (idx, item_scale(stack, idx, level_B, train))

    def per_item(batch: int) -> tuple[Array, Array]:
        if fixed is None:
            idx = jnp.zeros((batch,), jnp.int32)
            return idx, item_scale(stack, idx, level_B, train)
        if fixed[0].shape != (batch,):
            raise LoraError(f"LoRA index has shape {fixed[0].shape}, the batch has {batch} items")
        return fixed

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense) or module.is_initializing():
            return next_fun(*args, **kwargs)
        adapter = flat.get(tuple(module.path))
        if adapter is None:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        if train and dropout > 0.0:
            keep = jax.random.bernoulli(module.make_rng(rng_stream), 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0.0).astype(x.dtype)
        idx, scale = per_item(x.shape[0])
        dtype = module.dtype or y.dtype
        return y + _lora_delta(x, adapter[0], adapter[1], idx, scale, strategy, dtype).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        yield


def apply_model(model: nn.Module, params: dict, lora: LoraStack | None, lora_index: Array | None, *args: Any,
                level: Array | None = None, train: bool = False, dropout: float = 0.0, method: Any = None,
                rngs: dict | None = None, strategy: str | None = None, **kwargs: Any) -> Any:  # fmt: skip
    """`model.apply({"params": params}, *args, method=..., rngs=..., **kwargs)` with the LoRAs applied.
    `level` defaults to `args[0].level` when the first argument is a Batch."""
    if lora is not None and level is None and args and hasattr(args[0], "level"):
        level = args[0].level
    with lora_context(lora, lora_index, level, train, dropout, strategy=strategy):
        return model.apply({"params": params}, *args, method=method, rngs=rngs, **kwargs)


__all__ = [
    "LoraConfig", "LoraError", "LoraStack", "init_lora", "lora_targets", "is_target", "adapters",
    "check_lora", "merge_lora", "stack_loras", "item_scale", "lora_context", "apply_model", "lora_logical_axes",
    "reference_module_name",
]
