"""The training input pipeline (grain) over a dataset written by `python -m valle_jax.prepare`.

    it = make_iterator(cfg, "train", jax.process_index(), jax.process_count())
    batch = next(it)     # dict of numpy arrays, this process's slice of the global batch:
                         # text [b, T] int32, text_len [b], prom [b, P, Q], prom_len [b], resp [b, R, Q],
                         # resp_len [b], level [b]   (all int32)
    state = it.get_state(); it.set_state(state)          # or grain.checkpoint.CheckpointSave(it) in orbax

Train is infinite (epoch after epoch, reshuffled with (data.seed, epoch)); eval is one deterministic pass.
Shapes are static per bucket (batching.py): the trainer compiles one program per bucket. Each global batch is
the same on every host; host i of n takes rows [i * b/n, (i + 1) * b/n), so the hosts' slices are disjoint
and together cover the batch.  With `data.num_workers` > 0, batches are assembled in grain worker processes
(absl flags are marked parsed first, which grain needs).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from valle_jax.codec.specs import codec_spec

from .batching import BatchPlan, Bucket, assemble, max_prompt_frames, plan_buckets, prompt_frames, sample_prompt
from .records import DatasetError, decode_record, iter_items, load_metadata, shard_paths

__all__ = ["DataPipeline", "SPLIT_CODES", "describe", "make_iterator"]

log = logging.getLogger(__name__)

SPLIT_CODES = {"train": 1, "eval": 2}


class _Store:
    """Random access to one prepared dataset's records (ArrayRecord shards), opened lazily so that it can be
    pickled into grain worker processes."""

    def __init__(self, root: str):
        self.root = str(root)
        self.meta = load_metadata(root)
        self.paths = shard_paths(root, self.meta)
        self._source = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"root": self.root, "meta": self.meta, "paths": self.paths}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._source = None
        self._lock = threading.Lock()

    def read(self, indices: list[int]) -> list[dict]:
        if self._source is None:
            with self._lock:
                if self._source is None:
                    import grain

                    self._source = grain.sources.ArrayRecordDataSource(self.paths)
        raw = self._source.__getitems__([int(i) for i in indices])
        return [decode_record(r) for r in raw]


def _items(store: _Store, splits: tuple[str, ...], data_cfg) -> tuple[list[dict], int]:
    out, filtered = [], 0
    for split in splits:
        for it in iter_items(store.meta, split):
            if data_cfg.min_duration <= it["duration"] <= data_cfg.max_duration:
                out.append(it)
            else:
                filtered += 1
    out.sort(key=lambda x: x["index"])
    return out, filtered


class DataPipeline:
    """Everything `make_iterator` builds, exposed for the trainer and tests: `buckets` (static shapes),
    `plan` (global batches), `dropped` (utterances no bucket holds), `filtered` (outside min/max_duration),
    `dataset()` (the grain IterDataset) and `batch(k)` (global batch k assembled here, without grain)."""

    def __init__(self, cfg, split: str = "train", process_index: int = 0, process_count: int = 1):
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
        data = cfg.data
        if data.path == "synthetic":
            raise ValueError("data.path 'synthetic' is the trainer's built-in synthetic data, not a dataset folder")
        self.cfg = cfg
        self.split = split
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.q = int(cfg.model.resp_levels)
        self.stop_token = int(cfg.model.stop_token)
        self.levels = np.asarray(cfg.model.training_levels, np.int64)
        if self.levels.size == 0:
            raise ValueError("the RVQ level distribution is empty (check experimental.rvq_level_range / p_rvq_levels)")

        main = _Store(data.path)
        ev = _Store(data.eval_path) if data.eval_path else None
        # frames per second of the codes: the dataset's own unless the config says otherwise
        fps = data.frames_per_second or main.meta.get("frames_per_second") or codec_spec(main.meta["codec"]).reference_fps
        data = dataclasses.replace(data, frames_per_second=fps)
        self.cfg = cfg = dataclasses.replace(cfg, data=data)
        for st in (main, ev):
            if st is None:
                continue
            if st.meta["levels"] < self.q:
                raise DatasetError(f"{st.root}: codes have {st.meta['levels']} levels, model.resp_levels is {self.q}")
            if st.meta.get("frames_per_second") not in (None, fps):
                log.warning("%s holds %s codes at %s frames/s but data.frames_per_second is %s", st.root,
                            st.meta.get("codec"), st.meta.get("frames_per_second"), fps)  # fmt: skip
            if st.meta.get("random_codec") is not None:
                log.warning("%s: %s", st.root, st.meta.get("warning") or "codes come from a RANDOM codec")

        # Bucket shapes from every utterance the run can see (train and eval alike), so both splits share them.
        main_items = _items(main, ("train", "eval"), data)[0]
        ev_items = _items(ev, ("train", "eval"), data)[0] if ev is not None else []
        all_items = main_items + ev_items
        multiple = math.lcm(self.process_count, max(1, int(getattr(data, "batch_multiple", 1))))
        all_prompts = prompt_frames(np.array([it["index"] for it in all_items], np.int64), data)
        self.buckets, all_assign = plan_buckets(np.array([it["text_len"] for it in all_items]),
                                                np.array([it["frames"] for it in all_items]), all_prompts, cfg.model, data,
                                                multiple)  # fmt: skip
        if not self.buckets:
            shortest = min((it["text_len"] + p + it["frames"] + 1 for it, p in zip(all_items, all_prompts)), default=0)
            raise DatasetError(f"no bucket of data.length_buckets {list(data.length_buckets)} holds any utterance: the "
                               f"shortest needs {shortest} rows with its prompt (prompts up to "
                               f"{max_prompt_frames(data)} frames: data.prompt_duration_range)")  # fmt: skip
        # (store, utterance index) -> (bucket, prompt frames): the main and eval stores number their records apart
        stores = [main.root] * len(main_items) + [ev.root if ev is not None else ""] * len(ev_items)
        self._plan_of = {(root, it["index"]): (int(k), int(p))
                         for root, it, k, p in zip(stores, all_items, all_assign, all_prompts)}  # fmt: skip
        budget = data.batch_tokens if data.batch_tokens is not None else 0
        for b in self.buckets:
            if budget and b.batch * b.rows > budget:
                log.warning("bucket of %d rows: batch %d exceeds data.batch_tokens %d (one row per process at least)",
                            b.rows, b.batch, data.batch_tokens)  # fmt: skip

        # The split's utterances and the speakers' prompt pools.
        if split == "train":
            self.store = main
            self.items, self.filtered = _items(main, ("train",), data)
            pool_items = self.items
        elif ev is not None:
            self.store = ev
            items, self.filtered = _items(ev, ("eval",), data)
            if not items:
                items, self.filtered = _items(ev, ("train", "eval"), data)
            self.items = items
            pool_items = _items(ev, ("train", "eval"), data)[0]
        else:
            self.store = main
            self.items, self.filtered = _items(main, ("eval",), data)
            pool_items = _items(main, ("train", "eval"), data)[0]  # eval prompts may come from train utterances
        if not self.items:
            raise DatasetError(f"{self.store.root}: the {split} split is empty")
        by_speaker: dict[str, list[int]] = {}
        for it in pool_items:
            by_speaker.setdefault(it["speaker"], []).append(it["index"])
        self.pools = {s: np.asarray(sorted(v), np.int64) for s, v in by_speaker.items()}

        assign = np.array([self._plan_of[(self.store.root, it["index"])][0] for it in self.items], np.int64)
        self.prompt_target = {it["index"]: self._plan_of[(self.store.root, it["index"])][1] for it in self.items}
        self.dropped = int((assign < 0).sum())
        self.plan = BatchPlan(assign, self.buckets, data.seed, shuffle=(split == "train"))
        if self.plan.per_epoch == 0:
            raise DatasetError(f"{self.store.root}: no {split} utterance fits the buckets")
        self.max_prompt = max_prompt_frames(data)
        log.info("data %s (%s): %d utterances, %d dropped (longer than every bucket), %d outside min/max_duration; "
                 "%d batches per epoch; buckets %s", self.store.root, split, len(self.items), self.dropped,
                 self.filtered, self.plan.per_epoch, self.buckets)  # fmt: skip

    @property
    def local_batch(self) -> dict[int, int]:
        return {k: b.batch // self.process_count for k, b in enumerate(self.buckets)}

    def __len__(self) -> int:
        return sys.maxsize if self.split == "train" else self.plan.per_epoch

    def batch_items(self, k: int) -> tuple[Bucket, np.ndarray, np.ndarray]:
        """(bucket, this process's positions in global batch k, their utterance numbers in `items`)."""
        bk, rows = self.plan.batch(k)
        bucket = self.buckets[bk]
        n = bucket.batch // self.process_count
        pos = np.arange(self.process_index * n, (self.process_index + 1) * n)
        return bucket, pos, rows[pos]

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch k."""
        if k < 0 or k >= len(self):
            raise IndexError(k)
        bucket, pos, rows = self.batch_items(k)
        items = [self.items[i] for i in rows]
        records = self.store.read([it["index"] for it in items])
        cache = {it["index"]: r["codes"] for it, r in zip(items, records)}

        def read_codes(idx: int) -> np.ndarray:
            if idx not in cache:
                cache[idx] = self.store.read([idx])[0]["codes"]
            return cache[idx]

        texts, proms, resps, levels = [], [], [], []
        for j, it, rec in zip(pos, items, records):
            rng = np.random.default_rng([self.cfg.data.seed, SPLIT_CODES[self.split], int(k), int(j)])
            levels.append(int(self.levels[rng.integers(len(self.levels))]))
            pool = self.pools.get(it["speaker"], np.zeros(0, np.int64))
            pool = pool[pool != it["index"]]
            prom, _ = sample_prompt(rng, pool, self.cfg.data, self.max_prompt, read_codes, self.prompt_target[it["index"]])
            texts.append(rec["text_ids"].astype(np.int32))
            proms.append(prom)
            resps.append(rec["codes"])
        return assemble(bucket, texts, proms, resps, levels, self.q, self.stop_token)

    def dataset(self):
        """The grain IterDataset of this process's batches (thread prefetch; worker processes when
        data.num_workers > 0)."""
        import grain

        ds = grain.MapDataset.source(_BatchSource(self)).to_iter_dataset(
            grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
        )
        workers = int(self.cfg.data.num_workers)
        if workers > 0:
            _absl_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
        return ds


class _BatchSource:
    """grain random-access source: element k is this process's slice of global batch k."""

    def __init__(self, pipeline: DataPipeline):
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.pipeline)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        return self.pipeline.batch(int(k))

    def __repr__(self) -> str:
        p = self.pipeline
        return f"ValleBatches({p.store.root!r}, split={p.split}, process={p.process_index}/{p.process_count})"


def _absl_parsed() -> None:
    # grain's worker processes read absl flags; without parsing they raise UnparsedFlagAccessError (stack.md).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(cfg, split: str = "train", process_index: int = 0, process_count: int = 1) -> Any:
    """A checkpointable grain DatasetIterator over this process's slices of the global batches (module
    docstring). Works with `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` inside orbax."""
    return iter(DataPipeline(cfg, split, process_index, process_count).dataset())


def describe(cfg, process_count: int = 1) -> dict:
    """Bucket shapes and counts of a config's dataset (for logs and the trainer's compile plan)."""
    p = DataPipeline(cfg, "train", 0, process_count)
    return {"buckets": [b.__dict__ for b in p.buckets], "per_epoch": p.plan.per_epoch, "train_items": len(p.items),
            "dropped": p.dropped, "filtered": p.filtered, "root": str(Path(cfg.data.path))}  # fmt: skip
