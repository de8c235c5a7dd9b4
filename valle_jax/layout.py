"""The sequence layout and host-side batches: one home, numpy only (no jax import; data/ and codec/ use it).

A VALL-E input is, per item (spec reference-model.md 2.2):

    text · sep · [rvq level · sep] · prompt · sep · response          (the rvq segment from version 5 on)

where a missing prompt drops its segment and separator, and the response has no separator after it. A batch
is right-padded to static shapes (`Batch`); `row_layout` says where every row of the assembled sequence comes
from. It is written once over an array module `xp` (numpy here and in tests, jax.numpy inside the model).

Shapes: B batch, T/P/R padded text/prompt/response lengths, Q code columns, S sequence rows.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

SEGMENTS_V5 = ("text", "rvq", "prom", "resp")
SEGMENTS_V2 = ("text", "prom", "resp")
BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048)


class Batch(NamedTuple):
    """Right-padded model inputs. Codes are [frames, levels] per item as the reference's `prom`/`resp`."""

    text: Any  # [B, T] int32 token ids incl. BOS/EOS
    text_len: Any  # [B]
    prom: Any  # [B, P, Q] int32 prompt codes
    prom_len: Any  # [B]; 0 = no prompt (the segment and its separator are omitted, spec 2.2)
    resp: Any  # [B, R, Q'] int32 response codes (level 0 for the AR, levels 0..L-1 for NAR level L)
    resp_len: Any  # [B]; 0 is allowed (first AR step: the sequence then ends with a separator)
    level: Any  # [B] target RVQ level: 0 = AR pass, 1.. = NAR pass


class RowLayout(NamedTuple):
    """Where every row of the assembled sequence comes from ([B, S] arrays unless noted)."""

    valid: Any  # bool, False on right padding
    positions: Any  # int32 RoPE positions (unified or per segment)
    resp_start: Any  # [B] first response row
    length: Any  # [B] number of valid rows
    segment: Any  # segment index of each row (n_segments on padding)
    offset: Any  # row index inside its segment (the separator sits at offset == segment length)
    is_sep: Any  # bool


# ----------------------------------------------------------------------------------------------- row counts


def bucket(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= n (multiples of the largest beyond it): a job compiles a few shapes only."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def segment_names(cfg: Any) -> tuple[str, ...]:
    return SEGMENTS_V5 if cfg.has_rvq_token else SEGMENTS_V2


def extra_rows(cfg: Any) -> int:
    """Rows besides text, prompt and response: the separators and the RVQ-level row."""
    return 4 if cfg.has_rvq_token else 2


def prefix_rows(cfg: Any, text: int, prom: int) -> int:
    """Rows of an AR prefix (text · sep · [rvq · sep] · prompt · sep) for padded text/prompt lengths."""
    return text + prom + extra_rows(cfg)


def sequence_rows(cfg: Any, text: int, prom: int, resp: int) -> int:
    """Static row count of a batch with these padded lengths: every segment plus its separator."""
    return prefix_rows(cfg, text, prom) + resp


def batch_rows(cfg: Any, batch: Batch) -> int:
    return sequence_rows(cfg, batch.text.shape[1], batch.prom.shape[1], batch.resp.shape[1])


# ----------------------------------------------------------------------------------------------- the layout


def segment_lengths(cfg: Any, batch: Batch, xp: Any = np) -> tuple[list[Any], list[Any]]:
    """Per segment (in `segment_names` order): length [B] and whether a separator follows it [B]."""
    B = batch.text.shape[0]
    yes = xp.ones((B,), bool)
    one = [xp.ones((B,), xp.int32)] if cfg.has_rvq_token else []
    lengths = [xp.asarray(batch.text_len)] + one + [xp.asarray(batch.prom_len), xp.asarray(batch.resp_len)]
    has_sep = [yes] + ([yes] if cfg.has_rvq_token else []) + [xp.asarray(batch.prom_len) > 0, ~yes]
    return lengths, has_sep  # a missing prompt drops its separator


def row_layout(cfg: Any, batch: Batch, n_rows: int, xp: Any = np) -> RowLayout:
    """Segment and offset of every row. A separator follows every present, non-final segment.

    Per-segment positions (spec 2.5): a segment of length n with its separator gets 0..n, the final one 0..n-1,
    padding gets 1. Unified positions: the row index.
    """
    lengths, has_sep = segment_lengths(cfg, batch, xp)
    occupancy = xp.stack([n + s.astype(xp.int32) for n, s in zip(lengths, has_sep)], axis=-1)  # [B, n_seg]
    ends = xp.cumsum(occupancy, axis=-1)
    starts = ends - occupancy
    rows = xp.arange(n_rows)[None, :]
    segment = xp.sum(rows[:, :, None] >= ends[:, None, :], axis=-1)  # [B, S]
    n_segments = len(lengths)
    valid = segment < n_segments
    seg_index = xp.minimum(segment, n_segments - 1)
    offset = rows - xp.take_along_axis(starts, seg_index, axis=1)
    is_sep = valid & (offset == xp.take_along_axis(xp.stack(lengths, axis=-1), seg_index, axis=1))
    if cfg.experimental.unified_position_ids:
        positions = xp.broadcast_to(rows, segment.shape)
    else:
        positions = xp.where(valid, offset, 1)
    return RowLayout(valid, positions.astype(xp.int32), starts[:, -1], ends[:, -1], segment, offset, is_sep)


# ----------------------------------------------------------------------------------------------- host batches


def _codes(a: Any, q: int | None) -> np.ndarray:
    """Codes as [frames, columns] (an empty prompt may come as None, shape [0] or [0, Q]); first q columns."""
    a = np.zeros((0, q or 1), np.int32) if a is None else np.asarray(a)
    a = a.reshape(len(a), a.shape[-1] if a.ndim == 2 else 1)
    return a if q is None else a[:, :q]


def make_batch(items: Sequence[Mapping[str, Any]], *, levels: Sequence[int] | None = None, q: int | None = None,
               stop_token: int | None = None, pad_to: Mapping[str, int] | None = None) -> Batch:  # fmt: skip
    """Pad items {"text" [T], "prom" [P, Q] (or None), "resp" [R, Q'], optional "level"} into a numpy Batch.

    `levels` overrides the items' levels; `q` keeps the first q code columns (default: as many as the widest
    item has); `stop_token` appends one stop token to column 0 of every level-0 item's response (a training
    target, spec 5.1; one token even when causal_size > 1); `pad_to` gives minimum (static bucket) sizes of
    "text", "prom" and "resp". Every dimension is at least 1 row.
    """
    pad_to = pad_to or {}
    b = len(items)
    lv = [int(it.get("level", 0)) for it in items] if levels is None else [int(x) for x in levels]
    texts = [np.asarray(it["text"]).reshape(-1) for it in items]
    proms = [_codes(it.get("prom"), q) for it in items]
    resps = [_codes(it["resp"], q) for it in items]
    extra = [1 if stop_token is not None and level == 0 else 0 for level in lv]
    Q = q or max(a.shape[1] for a in proms + resps)
    T = max([len(t) for t in texts] + [pad_to.get("text", 0), 1])
    P = max([len(p) for p in proms] + [pad_to.get("prom", 0), 1])
    room = 1 if stop_token is not None else 0  # every item gets a row for a stop token: shapes do not depend on levels
    R = max([len(r) + room for r in resps] + [pad_to.get("resp", 0), 1])
    out = Batch(np.zeros((b, T), np.int32), np.zeros(b, np.int32), np.zeros((b, P, Q), np.int32),
                np.zeros(b, np.int32), np.zeros((b, R, Q), np.int32), np.zeros(b, np.int32),
                np.asarray(lv, np.int32).reshape(b))  # fmt: skip
    for i, (t, p, r, e) in enumerate(zip(texts, proms, resps, extra)):
        out.text[i, : len(t)], out.text_len[i] = t, len(t)
        out.prom[i, : len(p), : p.shape[1]], out.prom_len[i] = p, len(p)
        out.resp[i, : len(r), : r.shape[1]], out.resp_len[i] = r, len(r) + e
        if e:
            out.resp[i, len(r), 0] = stop_token
    return out


def training_batch(cfg: Any, items: Sequence[Mapping[str, Any]], levels: Sequence[int],
                   pad_to: Mapping[str, int] | None = None) -> Batch:  # fmt: skip
    """Items {"text", "prom", "resp" (all levels)} at the given target levels -> a training Batch: every code
    column of the model, a stop token after each level-0 item's response (the loss's target)."""
    return make_batch(items, levels=levels, q=cfg.resp_levels, stop_token=cfg.stop_token, pad_to=pad_to)


def as_batch(data: Mapping[str, Any] | Batch) -> Batch:
    """A pipeline element (dict with the Batch field names, or a Batch) -> Batch of int32 numpy arrays."""
    if isinstance(data, Batch):
        return Batch(*(np.asarray(x, np.int32) for x in data))
    missing = [k for k in Batch._fields if k not in data]
    if missing:
        raise ValueError(f"input batch lacks {missing} (has {sorted(data)})")
    return Batch(*(np.asarray(data[k], np.int32) for k in Batch._fields))


def before_stop(raw: np.ndarray, stop: int) -> np.ndarray:
    """The reference's returned AR sequence: the tokens before the first stop token (all when none)."""
    raw = np.asarray(raw)
    hits = np.flatnonzero(raw == stop)
    return raw[: hits[0]] if len(hits) else raw
