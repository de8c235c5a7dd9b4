"""Host-side batching, numpy only: buckets with static shapes, the per-epoch batch plan, level sampling,
speaker prompts (spec reference-model.md 5.1 and 8.5) and the assembly of one padded batch.

Buckets are token budgets, not fixed layouts.  A bucket is a sequence length S (one of `data.length_buckets`): an
utterance belongs to the smallest S that holds its whole assembled sequence, text t + prompt p + response r + 1
(the stop token) + the separator rows, so short prompts leave no padding inside the sequence (there is no fixed
6 s prompt segment: the model assembles each item's segments back to back and pads only at the end).  The batch's
arrays are padded per bucket to the longest text T, prompt P and response R among its members (multiples of 8;
they feed the embedding lookups only); the model runs S rows (`rows` in each batch).  The global batch size of a
bucket is min(max_batch, batch_tokens // S), rounded down to a multiple of lcm(process_count, batch_multiple) (at
least that multiple), so b * S <= batch_tokens wherever the budget allows one row per process.  `batch_tokens`
unset: `DEFAULT_BATCH_TOKENS` per device of the platform (the trainer multiplies by the batch shards).

Prompt lengths.  The reference draws a prompt duration uniformly in prompt_duration_range for every sample.  Here
each utterance draws its prompt length once per run, from (seed, utterance index), with that same distribution,
so that its bucket is known before batches are drawn and every epoch has the same batches count; which of the
speaker's other utterances form the prompt, and where they are cut, is drawn anew for every batch.  (An utterance
whose speaker has no other utterance gets no prompt, as in the reference.)

Batch plan.  Per epoch (train): each bucket's utterances are shuffled with (seed, epoch), cut into
ceil(n / b) batches (the last one filled up by wrapping around to the start of the shuffled list), and the
batches of all buckets are shuffled together.  Every epoch has the same number of batches, so global batch k
belongs to epoch k // per_epoch.  Eval: one pass in a fixed order, no shuffling.

Per item draws.  Item j of global batch k draws its RVQ level and its prompt pieces from a generator seeded with
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
    "DEFAULT_BATCH_TOKENS",
    "assemble",
    "batch_size_for",
    "default_batch_tokens",
    "max_prompt_frames",
    "plan_buckets",
    "prompt_frames",
    "sample_prompt",
]

PAD_MULTIPLE = 8
# data.batch_tokens unset: tokens (sequence rows) per device and step. CPU: what a laptop trains in seconds; GPU
# (80-141 GB): 32k rows keeps an H100/H200 busy at the released shape; TPU (16-32 GB HBM per chip): 16k.
DEFAULT_BATCH_TOKENS = {"cpu": 8192, "gpu": 32768, "rocm": 32768, "tpu": 16384}


def default_batch_tokens(platform: str, batch_shards: int = 1) -> int:
    """The global token budget for `data.batch_tokens: null` on `platform` with `batch_shards` data shards."""
    return DEFAULT_BATCH_TOKENS.get(platform, DEFAULT_BATCH_TOKENS["cpu"]) * max(1, int(batch_shards))


def max_prompt_frames(data_cfg) -> int:
    lo, hi = (list(data_cfg.prompt_duration_range) + [0.0, 0.0])[:2]
    if data_cfg.max_prompts <= 0 or hi <= 0:
        return 0
    return max(1, math.ceil(hi * data_cfg.frames_per_second))


@dataclass(frozen=True)
class Bucket:
    rows: int  # S: the assembled sequence length the model runs (every member's t + p + r + 1 + extra <= S)
    batch: int  # global batch size
    text: int  # T: array padding of the texts
    prom: int  # P: of the prompts
    resp: int  # R: of the responses (frames + room for the stop token)

    def shapes(self, q: int, process_count: int = 1) -> dict[str, tuple[int, ...]]:
        b = self.batch // process_count
        return {"text": (b, self.text), "text_len": (b,), "prom": (b, self.prom, q), "prom_len": (b,),
                "resp": (b, self.resp, q), "resp_len": (b,), "level": (b,), "rows": (b,)}  # fmt: skip


def batch_size_for(rows: int, data_cfg, multiple: int) -> int:
    budget = data_cfg.batch_tokens if data_cfg.batch_tokens is not None else DEFAULT_BATCH_TOKENS["cpu"]
    b = min(int(data_cfg.max_batch), int(budget) // rows)
    return max(multiple, (b // multiple) * multiple)


def prompt_frames(indices: np.ndarray, data_cfg) -> np.ndarray:
    """Each utterance's prompt length in frames (module docstring): uniform in prompt_duration_range seconds,
    drawn once from (seed, utterance index), at least 1 and at most `max_prompt_frames`."""
    hi_frames = max_prompt_frames(data_cfg)
    if hi_frames == 0:
        return np.zeros(len(indices), np.int64)
    lo, hi = (list(data_cfg.prompt_duration_range) + [0.0, 0.0])[:2]
    fps = float(data_cfg.frames_per_second)
    out = np.empty(len(indices), np.int64)
    for n, idx in enumerate(np.asarray(indices, np.int64)):
        u = np.random.default_rng([int(data_cfg.seed), 11, int(idx)]).uniform(lo, hi) if hi > lo else hi
        out[n] = int(u * fps)
    return np.clip(out, 1, hi_frames)


def _ceil(n: int) -> int:
    return max(PAD_MULTIPLE, -(-int(n) // PAD_MULTIPLE) * PAD_MULTIPLE)


def plan_buckets(text_lens: np.ndarray, frames: np.ndarray, prompts: np.ndarray, model_cfg, data_cfg,
                 multiple: int = 1) -> tuple[list[Bucket], np.ndarray]:  # fmt: skip
    """Static bucket shapes and each utterance's bucket (-1 = fits none; see the module docstring). `prompts`: each
    utterance's prompt length in frames (`prompt_frames`)."""
    t = np.asarray(text_lens, np.int64)
    r = np.asarray(frames, np.int64) + 1
    p = np.asarray(prompts, np.int64)
    need = t + p + r + extra_rows(model_cfg)
    assign = np.full(t.shape, -1, np.int64)
    buckets: list[Bucket] = []
    for S in sorted(set(int(s) for s in data_cfg.length_buckets)):
        fits = (assign < 0) & (need <= S)
        if not fits.any():
            continue
        assign[fits] = len(buckets)
        buckets.append(Bucket(rows=S, batch=batch_size_for(S, data_cfg, multiple), text=_ceil(t[fits].max()),
                              prom=_ceil(p[fits].max()), resp=_ceil(r[fits].max())))  # fmt: skip
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
                  read_codes: Callable[[int], np.ndarray], target: int | None = None) -> tuple[np.ndarray | None, list[int]]:  # fmt: skip
    """A prompt from 1..max_prompts other utterances of the speaker (spec 8.5): a target length (`target` frames,
    else drawn in prompt_duration_range seconds), each utterance trimmed to it at a random offset, concatenated
    until long enough, trimmed again.  `pool`: the speaker's other utterances (without the target).  Returns
    (codes or None when the pool is empty, the utterances used)."""
    if len(pool) == 0 or max_frames <= 0:
        return None, []
    if target is None:
        lo, hi = (list(data_cfg.prompt_duration_range) + [0.0, 0.0])[:2]
        target = int(rng.uniform(lo, hi) * data_cfg.frames_per_second) if hi > lo else int(hi * data_cfg.frames_per_second)
    target = min(max(int(target), 1), max_frames)
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
    token), as a dict of the Batch fields plus `rows` (the bucket's sequence length, per item)."""
    items = [{"text": t, "prom": p, "resp": r} for t, p, r in zip(texts, proms, resps)]
    batch = make_batch(items, levels=levels, q=q, stop_token=stop_token,
                       pad_to={"text": bucket.text, "prom": bucket.prom, "resp": bucket.resp})  # fmt: skip
    return {**batch._asdict(), "rows": np.full(len(items), bucket.rows, np.int32)}
