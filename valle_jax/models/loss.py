"""Training targets and losses of the reference (spec reference-model.md 5.1-5.3).

A training batch (`layout.training_batch`) is a `Batch` whose `resp` holds all levels [B, R+1, Q] and whose
`level` is each item's target level; level-0 items carry one appended stop token in column 0 (resp_len = R + 1). Inputs read
only the columns below the level (the embedding rules zero the rest), targets read column L.

Two modes, as the reference: the joint loss (`loss_factors` empty: mean over items of each item's mean
cross-entropy over the whole sequence) and the split loss (per segment text / prom / resp, weighted). With
`faithful_nan=True` a segment with no targets gives NaN exactly as torch's mean over nothing; the trainer
uses `faithful_nan=False`, where such a segment contributes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from valle_jax import layout
from valle_jax.config import ModelConfig
from valle_jax.layout import Batch

Array = jax.Array
IGNORE = -100


def targets(cfg: ModelConfig, batch: Batch, n_rows: int) -> tuple[Array, Array, Array, Array]:
    """Per row: target id or IGNORE [B, S], segment index, offset in segment, segment length."""
    lengths, _ = layout.segment_lengths(cfg, batch, jnp)
    lay = layout.row_layout(cfg, batch, n_rows, jnp)
    segment, offset, is_sep = lay.segment, lay.offset, lay.is_sep
    names = layout.segment_names(cfg)
    B = batch.text.shape[0]
    L = batch.level
    ignore_prom = cfg.version < 4 or (cfg.version >= 5 and cfg.experimental.audio_embedding_sums)

    def at(arr_BN, off):
        return jnp.take_along_axis(arr_BN, jnp.clip(off, 0, arr_BN.shape[1] - 1), axis=1)

    col = lambda codes_BNQ: jnp.take_along_axis(codes_BNQ, L[:, None, None], axis=2)[..., 0]  # noqa: E731
    per_segment = {
        "text": at(batch.text, offset),
        "rvq": jnp.broadcast_to(L[:, None], offset.shape),
        "prom": jnp.full(offset.shape, IGNORE) if ignore_prom else at(col(batch.prom), offset),
        "resp": at(col(batch.resp), offset),
    }
    tgt = jnp.full((B, n_rows), IGNORE, jnp.int32)
    for k, name in enumerate(names):
        tgt = jnp.where((segment == k) & ~is_sep, per_segment[name].astype(jnp.int32), tgt)
    seg_len = jnp.take_along_axis(jnp.stack(lengths, -1), jnp.minimum(segment, len(names) - 1), axis=1)
    tgt = jnp.where(segment < len(names), tgt, IGNORE)
    return tgt, segment, offset, seg_len


def causal_items(cfg: ModelConfig, batch: Batch) -> Array:
    """Items trained with shifted targets: the AR level of an AR model, every item of a model without "nar"."""
    if not cfg.has_nar:
        return jnp.ones_like(batch.level, bool)
    return (batch.level == 0) & ("ar" in cfg.capabilities)


def _token_nll(logits_BSV: Array, tgt_BS: Array) -> tuple[Array, Array, Array]:
    """(-log p(target), valid, target in top-10) per row; logits float32, -inf columns allowed."""
    valid = tgt_BS != IGNORE
    safe = jnp.where(valid, tgt_BS, 0)
    logz = jax.nn.logsumexp(logits_BSV, axis=-1)
    picked = jnp.take_along_axis(logits_BSV, safe[..., None], axis=-1)[..., 0]
    rank = jnp.sum(logits_BSV > picked[..., None], axis=-1)
    return logz - picked, valid, rank < 10


def _mean(x: Array, w: Array, faithful_nan: bool) -> Array:
    n = w.sum(-1)
    total = jnp.where(w, x, 0.0).sum(-1)
    return total / n if faithful_nan else jnp.where(n > 0, total / jnp.maximum(n, 1), 0.0)


def _shift_rows(x_BS: Array, c: int, fill) -> Array:
    """y[:, p] = x[:, p + c] (fill past the end)."""
    return jnp.concatenate([x_BS[:, c:], jnp.full((x_BS.shape[0], c), fill, x_BS.dtype)], axis=1)


def joint_loss(cfg: ModelConfig, logits_BSV: Array, batch: Batch, faithful_nan: bool = True) -> tuple[Array, dict]:
    """`nll`: mean over items of each item's mean cross-entropy; causal items use logits[:-c] vs targets[c:]."""
    S = logits_BSV.shape[1]
    tgt, _, _, _ = targets(cfg, batch, S)
    causal = causal_items(cfg, batch)[:, None]
    tgt = jnp.where(causal, _shift_rows(tgt, cfg.causal_size, IGNORE), tgt)
    nll, valid, top10 = _token_nll(logits_BSV, tgt)
    per_item = _mean(nll, valid, faithful_nan)
    metrics = {"nll": per_item.mean(), "acc": jnp.where(valid, top10, False).sum() / jnp.maximum(valid.sum(), 1),
               "item_nll": per_item, "item_acc": _mean(top10.astype(jnp.float32), valid, False),
               "item_targets": valid.sum(-1)}  # fmt: skip
    return per_item.mean(), metrics


def split_loss(cfg: ModelConfig, logits_BSV: Array, batch: Batch, factors: dict[str, float],
               faithful_nan: bool = True) -> tuple[Array, dict]:  # fmt: skip
    """Per-segment losses Σ_items CE × factor / B for text, prom, resp (5.3); causal items shift each segment
    of length > 1 inside itself, so no separator-to-first-token prediction is trained."""
    S = logits_BSV.shape[1]
    tgt, segment, offset, seg_len = targets(cfg, batch, S)
    c = cfg.causal_size
    causal = causal_items(cfg, batch)[:, None]
    shift = causal & (seg_len > 1)
    shifted = jnp.where(offset + c < seg_len, _shift_rows(tgt, c, IGNORE), IGNORE)
    pair = jnp.where(shift, shifted, tgt)
    nll, valid, top10 = _token_nll(logits_BSV, pair)
    B = logits_BSV.shape[0]
    losses, metrics = {}, {}
    for k, name in enumerate(layout.segment_names(cfg)):
        factor = float(factors.get(name, 0.0))
        if name not in ("text", "prom", "resp") or factor == 0.0:
            continue
        in_seg = valid & (segment == k) & (offset < seg_len)
        losses[name] = _mean(nll, in_seg, faithful_nan).sum() * factor / B
        metrics[f"acc_{name}"] = jnp.where(in_seg, top10, False).sum() / jnp.maximum(in_seg.sum(), 1)
    total = sum(losses.values())
    return total, {**losses, **metrics}


def loss(cfg: ModelConfig, logits_BSV: Array, batch: Batch, faithful_nan: bool = True) -> tuple[Array, dict]:
    """The reference's training loss for `cfg.loss_factors` (empty -> joint)."""
    if cfg.loss_factors:
        return split_loss(cfg, logits_BSV, batch, cfg.loss_factors, faithful_nan)
    return joint_loss(cfg, logits_BSV, batch, faithful_nan)
