"""Host-side batching, numpy only: buckets with static shapes, the per-epoch batch plan, level sampling,
speaker prompts (spec reference-model.md 5.1 and 8.5) and the assembly of one padded batch.

Bucket shapes.  A batch is [b, T] text, [b, P, Q] prompt and [b, R, Q] response codes; the model assembles
T + P + R + 4 rows (T + P + R + 2 for version 2, no RVQ-level row).  For each `data.length_buckets` value S,
P is the longest prompt the config can draw (ceil(prompt_duration_range[1] * frames_per_second)), T a
multiple of 8 and R = S - extra - P - T, so every batch of the bucket assembles to exactly S rows; T is
chosen (from the data, the same on every host) to fit the most of the utterances not taken by a smaller
bucket.  An utterance fits when its text length <= T and its frames + 1 (room for the stop token) <= R.
Utterances that fit no bucket are dropped and counted.  The global batch size of a bucket is
min(max_batch, batch_tokens // S), rounded down to a multiple of lcm(process_count, batch_multiple) (at
least that multiple), so b * S <= batch_tokens wherever the budget allows one row per process.

Batch plan.  Per epoch (train): each bucket's utterances are shuffled with (seed, epoch), cut into
ceil(n / b) batches (the last one filled up by wrapping around to the start of the shuffled list), and the
batches of all buckets are shuffled together.  Every epoch has the same number of batches, so global batch k
belongs to epoch k // per_epoch.  Eval: one pass in a fixed order, no shuffling.

Per item draws.  Item j of global batch k draws its RVQ level and its prompt from a generator seeded with
(seed, split, k, j): reproducible, independent of the number of hosts and of where an iterator was restored.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from valle_jax.layout import extra_rows, make_batch

__all__ = [
    "Bucket",
    "BatchPlan",
    "assemble",
    "batch_size_for",
    "max_prompt_frames",
    "plan_buckets",
    "sample_prompt",
]

PAD_MULTIPLE = 8


def max_prompt_frames(data_cfg) -> int:
    lo, hi = (list(data_cfg.prompt_duration_range) + [0.0, 0.0])[:2]
    if data_cfg.max_prompts <= 0 or hi <= 0:
        return 0
    return max(1, math.ceil(hi * data_cfg.frames_per_second))


@dataclass(frozen=True)
class Bucket:
    rows: int  # S = text + prom + resp + extra: the assembled sequence length
    batch: int  # global batch size
    text: int  # T
    prom: int  # P
    resp: int  # R (frames + room for the stop token)

    def shapes(self, q: int, process_count: int = 1) -> dict[str, tuple[int, ...]]:
        b = self.batch // process_count
        return {"text": (b, self.text), "text_len": (b,), "prom": (b, self.prom, q), "prom_len": (b,),
                "resp": (b, self.resp, q), "resp_len": (b,), "level": (b,)}  # fmt: skip


def batch_size_for(rows: int, data_cfg, multiple: int) -> int:
    b = min(int(data_cfg.max_batch), int(data_cfg.batch_tokens) // rows)
    return max(multiple, (b // multiple) * multiple)


def plan_buckets(text_lens: np.ndarray, frames: np.ndarray, model_cfg, data_cfg, multiple: int = 1
                 ) -> tuple[list[Bucket], np.ndarray]:  # fmt: skip
    """Static bucket shapes and each utterance's bucket (-1 = fits none). See the module docstring."""
    t = np.asarray(text_lens, np.int64)
    r = np.asarray(frames, np.int64) + 1
    assign = np.full(t.shape, -1, np.int64)
    extra = extra_rows(model_cfg)
    P = max(1, max_prompt_frames(data_cfg))
    buckets: list[Bucket] = []
    for S in sorted(set(int(s) for s in data_cfg.length_buckets)):
        avail = S - extra - P  # rows for T + R
        if avail < 2 * PAD_MULTIPLE:
            continue
        free = assign < 0
        if not free.any():
            break
        # count[T] = #{free items: t <= T and r <= avail - T}, for T = PAD_MULTIPLE, 2 * PAD_MULTIPLE, ...
        n_t = (avail - 1) // PAD_MULTIPLE
        tb = np.ceil(t[free] / PAD_MULTIPLE).astype(np.int64)  # smallest T index that holds the text
        ok = (tb <= n_t) & (r[free] <= avail - PAD_MULTIPLE)
        hist = np.zeros((n_t + 1, avail + 1), np.int64)
        np.add.at(hist, (tb[ok], r[free][ok]), 1)
        cum = hist.cumsum(0).cumsum(1)  # cum[i, j] = #{tb <= i, r <= j}
        Ts = np.arange(1, n_t + 1)
        counts = cum[Ts, avail - Ts * PAD_MULTIPLE]
        if counts.size == 0 or counts.max() == 0:
            continue
        T = int(Ts[int(np.argmax(counts))]) * PAD_MULTIPLE
        R = avail - T
        k = len(buckets)
        fits = free & (t <= T) & (r <= R)
        assign[fits] = k
        buckets.append(Bucket(rows=S, batch=batch_size_for(S, data_cfg, multiple), text=T, prom=P, resp=R))
    return buckets, assign


class BatchPlan:
    """Which utterances form global batch k (see the module docstring)."""

    def __init__(self, assign: np.ndarray, buckets: Sequence[Bucket], seed: int, shuffle: bool):
        self.buckets = list(buckets)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.members = [np.flatnonzero(np.asarray(assign) == k) for k in range(len(self.buckets))]
        self.batches_per_bucket = [math.ceil(len(m) / b.batch) for m, b in zip(self.members, self.buckets)]
        self.per_epoch = int(sum(self.batches_per_bucket))
        self._cache: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable into grain worker processes (no lock, no cache)
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_cache")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache = {}
        self._lock = threading.Lock()

    def epoch(self, e: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(bucket of each batch [per_epoch], the item matrices [n_batches, b] per bucket in batch order)."""
        with self._lock:
            hit = self._cache.get(e)
            if hit is None:
                hit = self._cache[e] = self._make_epoch(e)
                while len(self._cache) > 2:
                    self._cache.pop(min(k for k in self._cache if k != e))
            return hit

    def _make_epoch(self, e: int) -> tuple[np.ndarray, list[np.ndarray]]:
        rng = np.random.default_rng([self.seed, 7, e]) if self.shuffle else None
        bucket_of, rows = [], []
        for k, (m, b, n) in enumerate(zip(self.members, self.buckets, self.batches_per_bucket)):
            if n == 0:
                continue
            order = rng.permutation(m) if rng is not None else m
            filled = np.resize(order, n * b.batch).reshape(n, b.batch)  # wraps around to fill the last batch
            bucket_of.extend([k] * n)
            rows.extend(filled)
        bucket_of = np.asarray(bucket_of, np.int64)
        if rng is not None:
            perm = rng.permutation(len(rows))
            bucket_of = bucket_of[perm]
            rows = [rows[i] for i in perm]
        return bucket_of, rows

    def batch(self, k: int) -> tuple[int, np.ndarray]:
        """(bucket index, utterance indices [b]) of global batch k."""
        if self.per_epoch == 0:
            raise IndexError("the batch plan is empty")
        bucket_of, rows = self.epoch(k // self.per_epoch)
        j = k % self.per_epoch
        return int(bucket_of[j]), rows[j]


def _trim(codes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(codes) <= n:
        return codes
    start = int(rng.integers(0, len(codes) - n + 1))
    return codes[start : start + n]


def sample_prompt(rng: np.random.Generator, pool: np.ndarray, data_cfg, max_frames: int,
                  read_codes: Callable[[int], np.ndarray]) -> tuple[np.ndarray | None, list[int]]:  # fmt: skip
    """A prompt from 1..max_prompts other utterances of the speaker (spec 8.5): one target length drawn in
    prompt_duration_range seconds, each utterance trimmed to it at a random offset, concatenated until long
    enough, trimmed again.  `pool`: the speaker's other utterances (without the target).  Returns (codes or
    None when the pool is empty, the utterances used)."""
    if len(pool) == 0 or max_frames <= 0:
        return None, []
    lo, hi = (list(data_cfg.prompt_duration_range) + [0.0, 0.0])[:2]
    target = int(rng.uniform(lo, hi) * data_cfg.frames_per_second) if hi > lo else int(hi * data_cfg.frames_per_second)
    target = min(max(target, 1), max_frames)
    picks = rng.permutation(len(pool))[: max(1, int(data_cfg.max_prompts))]
    pieces, used, total = [], [], 0
    for p in picks:
        idx = int(pool[p])
        piece = _trim(read_codes(idx), target, rng)
        pieces.append(piece)
        used.append(idx)
        total += len(piece)
        if total >= target:
            break
    return _trim(np.concatenate(pieces, axis=0), target, rng), used


def assemble(bucket: Bucket, texts: Sequence[np.ndarray], proms: Sequence[np.ndarray | None],
             resps: Sequence[np.ndarray], levels: Sequence[int], q: int, stop_token: int) -> dict[str, np.ndarray]:  # fmt: skip
    """One padded training batch in the bucket's static shapes (`layout.make_batch`: level-0 items get one stop
    token), as a dict of the Batch fields."""
    items = [{"text": t, "prom": p, "resp": r} for t, p, r in zip(texts, proms, resps)]
    batch = make_batch(items, levels=levels, q=q, stop_token=stop_token,
                       pad_to={"text": bucket.text, "prom": bucket.prom, "resp": bucket.resp})  # fmt: skip
    return batch._asdict()
