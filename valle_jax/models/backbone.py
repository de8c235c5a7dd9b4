"""The backbone interface and registry: the one place that knows which backbones exist.

A backbone is the decoder stack between VALL-E's embeddings and its heads. Each backbone module registers a
`Backbone` (llama.py and retnet.py do, at import); everything else asks `get(cfg.arch_type)`. A new backbone
(e.g. a Mamba stack) is one module that calls `register` -- no other file changes.

The decoder is a Flax module built as `decoder(cfg)` with

    __call__(x_BSD, positions_BS, valid_BS, state=None, *, deterministic=True, step=False) -> (h_BSD, state')

* without `state`: the sequence form (training, teacher-forced passes); returns (hidden states, None);
* with `state` (from `init_state`): the S new rows continue each item's prefix (prefill and decoding) and the
  new state is returned; `step=True` marks a decode step (a backbone may pick a different but equal form);
* rows where `valid_BS` is False are right padding (or finished items) and leave the state unchanged;
* each decoder layer is wrapped by `remat_layer(layer_cls, cfg)`, so `cfg.remat` (a policy name) applies
  activation checkpointing inside the decoder.

This module imports no jax/flax at import time (the config validates names against it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

# Activation-checkpoint policies by name -> attribute of `jax.checkpoint_policies` (None: no remat).
REMAT_POLICIES: dict[str, str | None] = {
    "none": None,
    "full": "nothing_saveable",  # keep only each layer's input; recompute the rest
    "dots": "checkpoint_dots",  # keep matmul outputs, recompute elementwise ops
    "dots_no_batch": "dots_with_no_batch_dims_saveable",  # keep weight matmuls only
}
BUILTIN = {"llama": "valle_jax.models.llama", "retnet": "valle_jax.models.retnet"}  # registered on first use


def rows_dot_general(x: Any, kernel: Any, dimension_numbers: Any, precision: Any = None,
                     preferred_element_type: Any = None) -> Any:  # fmt: skip
    """A Dense layer's product x [..., In] . kernel [In, Out] as one 2-d matmul over the rows flattened
    ([N, In] . [In, Out]) and reshaped back: the same numbers. `dense_dot_general(cfg)` says when Dense layers
    use it: with 3-d activations, XLA's CPU backend builds the weight gradient from transposed copies of the
    activation gradient, which made the MLP's training step 3x slower there; the 2-d form needs none."""
    from jax import lax

    if tuple(map(tuple, dimension_numbers[0])) != ((x.ndim - 1,), (0,)) or any(dimension_numbers[1]):
        return lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)  # fmt: skip  # not a Dense product
    y = lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)  # fmt: skip
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def dense_dot_general(cfg: Any) -> Callable | None:
    """The `dot_general` of the model's Dense layers: `rows_dot_general` where `cfg.cpu_layouts` (CPU), else
    flax's default (None)."""
    return rows_dot_general if cfg.cpu_layouts else None


@dataclass(frozen=True)
class Backbone:
    """What VALL-E needs from a backbone. Only `name`, `decoder`, `init_state` and `state_axes` are required."""

    name: str
    decoder: Callable[[Any], Any]  # cfg -> flax module (see the module docstring for its call signature)
    init_state: Callable[[Any, int, int], Any]  # (cfg, batch, max_len) -> incremental state, batch-first leaves
    state_axes: Callable[[Any], Any]  # cfg -> logical axis names of every init_state leaf (same pytree)
    # reference checkpoints (convert.py): does this key set belong to this backbone, and which config fields do
    # the keys give (e.g. the FFN width)? `has_metadata` False: the file has no config metadata (spec 1.7).
    matches_keys: Callable[[Mapping[str, Any]], bool] | None = None
    config_from_keys: Callable[[Mapping[str, Any], dict, bool], dict] | None = None
    # LoRA targets (reference-lora.md): module-path substrings to include / exclude
    lora_targets: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    # (cfg, rows, cached) -> the attention computation a call runs, for logs and benchmarks; None: the backbone
    # has no attention choice and its name is the answer (RetNet's retention)
    attention_path: Callable[[Any, int, bool], str] | None = None


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Make `backbone` available as `arch_type: <backbone.name>`; registering a name again replaces it."""
    _REGISTRY[backbone.name] = backbone
    return backbone


def names() -> tuple[str, ...]:
    """Every backbone name a config may use (built-ins are listed without importing them)."""
    return tuple(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def get(name: str) -> Backbone:
    """The registered backbone `name` (a built-in is imported on first use)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"arch_type {name!r}: no such backbone (registered: {', '.join(names())})") from None


def all_backbones() -> list[Backbone]:
    """Every backbone, built-ins imported (for checkpoint detection)."""
    return [get(n) for n in names()]


def attention_path(cfg: Any, n_rows: int, cached: bool = False) -> str:
    """The attention computation a pass of `cfg`'s backbone over `n_rows` rows runs ("xla", "cudnn", "splash",
    or the backbone's name where it has no choice)."""
    b = get(cfg.arch_type)
    return b.attention_path(cfg, n_rows, cached) if b.attention_path is not None else b.name


def remat_layer(layer_cls: Any, cfg: Any) -> Any:
    """`layer_cls` itself, or wrapped in `nn.remat` with the policy `cfg.remat` names. Layers take only arrays
    (or None) as call arguments; static choices are module attributes, so no static_argnums are needed."""
    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat == "none":
        return layer_cls
    import flax.linen as nn
    import jax

    return nn.remat(layer_cls, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=True)
