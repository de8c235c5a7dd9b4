"""A synthetic, in-memory training set with the input pipeline's interface (`data.path: synthetic`).

For tests, benchmarks and smoke runs without a prepared corpus. Items are random phoneme ids with
response codes that follow a simple, learnable pattern of the text and the level (so a short run shows the
loss falling); the prompt is random codes. Shapes are static: the first `data.length_buckets` entry S
is split into text T = S/8, prompt P = S/4 and response R = S - T - P - (separator rows) rows (the response
bucket includes the stop token's row). The global batch is `data.max_batch` rows; each process gets an equal share.

    make_iterator(cfg, split="train", process_index=0, process_count=1) -> grain DatasetIterator

yields dicts of numpy arrays: text [b,T], text_len [b], prom [b,P,Q], prom_len [b], resp [b,R,Q], resp_len [b],
level [b] (int32), levels drawn from `ModelConfig.training_levels`. The iterator's state is saved with
`grain.checkpoint.CheckpointSave`; the train split repeats forever, the eval split is finite.
"""

from __future__ import annotations

import grain
import numpy as np

from valle_jax.config import Config
from valle_jax.layout import extra_rows, training_batch

TRAIN_ITEMS = 4096
EVAL_ITEMS = 256


def shapes(cfg: Config) -> dict[str, int]:
    S = int(cfg.data.length_buckets[0]) if cfg.data.length_buckets else 256
    T = max(4, S // 8)
    P = max(2, S // 4)
    R = S - T - P - extra_rows(cfg.model)
    if R < 3:
        raise ValueError(f"data.length_buckets[0] = {S}: too short for a synthetic item (need >= {S - R + 3})")
    return {"text": T, "prom": P, "resp": R}


def make_item(cfg: Config, index: int, seed: int) -> dict:
    m = cfg.model
    sz = shapes(cfg)
    rng = np.random.default_rng([seed, index])
    Q = m.resp_levels
    t = int(rng.integers(max(2, sz["text"] // 2), sz["text"] + 1))
    p = int(rng.integers(max(1, sz["prom"] // 2), sz["prom"] + 1))
    r = int(rng.integers(max(1, (sz["resp"] - 1) // 2), sz["resp"]))  # one row stays free for the stop token
    text = rng.integers(1, m.text_tokens, size=t).astype(np.int32)
    prom = rng.integers(0, m.audio_tokens, size=(p, Q)).astype(np.int32)
    frames = np.arange(r)[:, None]
    levels = np.arange(Q)[None, :]
    resp = (text[frames % t] * 7 + levels * 31 + frames // 3) % m.audio_tokens
    return {"text": text, "prom": prom, "resp": resp.astype(np.int32)}


def make_dataset(cfg: Config, split: str = "train", process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    global_batch = int(cfg.data.max_batch)
    if global_batch % process_count:
        raise ValueError(f"data.max_batch = {global_batch} does not divide by {process_count} processes")
    local = global_batch // process_count
    seed = int(cfg.data.seed) + (0 if split == "train" else 1000)
    n = TRAIN_ITEMS if split == "train" else EVAL_ITEMS
    pad_to = shapes(cfg)
    choices = np.asarray(cfg.model.training_levels, np.int32)

    def load(index: int, rng: np.random.Generator) -> dict:
        item = make_item(cfg, int(index), seed)
        item["level"] = int(rng.choice(choices))
        return item

    def collate(items: list[dict]) -> dict:
        b = training_batch(cfg.model, items, [it["level"] for it in items], pad_to)
        return {k: np.asarray(v, np.int32) for k, v in b._asdict().items()}

    ds = grain.MapDataset.range(n).shuffle(seed=seed)
    if split == "train":
        ds = ds.repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.random_map(load, seed=seed + 1)
    return ds.batch(local, drop_remainder=True, batch_fn=collate)


def make_iterator(cfg: Config, split: str = "train", process_index: int = 0, process_count: int = 1):
    """A checkpointable grain iterator of host-local batches (see the module doc)."""
    return iter(make_dataset(cfg, split, process_index, process_count).to_iter_dataset())
