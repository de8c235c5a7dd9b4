"""Dataset records and writer, duration buckets and the grain input pipeline (valle_jax.data).

The datasets here are written directly with DatasetWriter (no espeak-ng, no codec): utterance u of speaker s
has codes whose level-0 column is u everywhere and whose level-1 column counts frames, and text ids that
start with [1, u], so every row of a batch says where it came from.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from valle_jax.config import Config, DataConfig, ModelConfig
from valle_jax.data.batching import BatchPlan, assemble, plan_buckets
from valle_jax.data.pipeline import DataPipeline, make_iterator
from valle_jax.layout import extra_rows, training_batch
from valle_jax.data.records import (
    DatasetError,
    DatasetWriter,
    Utterance,
    decode_record,
    encode_record,
    load_metadata,
    read_jsonl,
)

SETTINGS = {"codec": "encodec", "levels": 8, "sample_rate": 24000, "frames_per_second": 75, "tokenizer": "bpe",
            "random_codec": None}  # fmt: skip
N_SPEAKERS = 4


def make_utt(u: int, speaker: int, frames: int, text_len: int, rng: np.random.Generator, q: int = 8) -> Utterance:
    codes = rng.integers(0, 1024, size=(frames, q)).astype(np.int16)
    codes[:, 0] = u
    codes[:, 1] = np.arange(frames) % 1024
    ids = np.concatenate([[1, u % 256], rng.integers(4, 256, size=text_len - 3), [2]]).astype(np.int64)
    return Utterance(id=f"s{speaker}/u{u:04d}", speaker=f"s{speaker}", text=f"text {u}", phonemes=f"ph {u}",
                     language="en", text_ids=ids, codes=codes, duration=frames / 75.0)  # fmt: skip


def write_dataset(root: Path, n: int = 96, seed: int = 0, too_long: int = 1, eval_fraction: float = 0.1,
                  singleton: bool = True) -> list[Utterance]:  # fmt: skip
    """n utterances over N_SPEAKERS speakers (plus one speaker with a single utterance), 0.7 to 5.3 s."""
    rng = np.random.default_rng(seed)
    utts = []
    for u in range(n):
        frames = int(rng.integers(50, 400))
        utts.append(make_utt(u + 1, u % N_SPEAKERS, frames, max(4, frames // 6 + int(rng.integers(-3, 4))), rng))
    for j in range(too_long):  # longer than every bucket in the test config, still within max_duration
        utts.append(make_utt(n + 1 + j, 0, 1400, 200, rng))
    if singleton:
        utts.append(make_utt(n + too_long + 1, 9, 120, 24, rng))
    with DatasetWriter(root, SETTINGS, shard_size=17, eval_fraction=eval_fraction) as w:
        for utt in utts:
            w.add(utt)
    return utts


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Utterance]]:
    root = tmp_path_factory.mktemp("ds")
    return root, write_dataset(root)


def config(root: Path, model: ModelConfig | None = None, **data) -> Config:
    settings = dict(path=str(root), length_buckets=[256, 384, 640], batch_tokens=4096, max_batch=12,
                    prompt_duration_range=[0.5, 1.5], max_prompts=3, min_duration=0.2, max_duration=30.0)  # fmt: skip
    return Config(model=model or ModelConfig(resp_levels=8), data=DataConfig(**{**settings, **data}))


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))  # fmt: skip


# ----------------------------------------------------------------------------------------------- records / writer


def test_record_roundtrip():
    rng = np.random.default_rng(0)
    utt = make_utt(7, 1, 33, 10, rng)
    rec = decode_record(encode_record(utt))
    assert rec["id"] == utt.id and rec["speaker"] == "s1" and rec["text"] == "text 7" and rec["phonemes"] == "ph 7"
    assert rec["codes"].dtype == np.int16 and np.array_equal(rec["codes"], utt.codes)
    assert rec["text_ids"].dtype == np.uint8 and np.array_equal(rec["text_ids"], utt.text_ids)
    big = Utterance("x", "s", "t", "p", "en", np.array([1, 300, 2]), utt.codes, 1.0)
    assert decode_record(encode_record(big))["text_ids"].dtype == np.uint16


def test_writer_metadata_and_splits(dataset):
    root, utts = dataset
    meta = load_metadata(root)
    assert meta["counts"]["train"] + meta["counts"]["eval"] == len(utts)
    assert meta["counts"]["eval"] == round(0.1 * len(utts))
    ids = [i for s in ("train", "eval") for spk in meta["splits"][s].values() for i in spk["ids"]]
    assert sorted(ids) == sorted(u.id for u in utts)
    spk = meta["splits"]["train"]["s1"]
    assert set(spk) >= {"ids", "durations", "texts", "indices", "frames", "text_lens"}
    assert sum(s["records"] for s in meta["shards"]) == len(utts)
    assert all(s["records"] <= 17 for s in meta["shards"])


def test_writer_resumes_and_cleans_up(tmp_path):
    rng = np.random.default_rng(1)
    utts = [make_utt(u, u % 2, 60, 10, rng) for u in range(1, 11)]
    with DatasetWriter(tmp_path, SETTINGS, shard_size=4) as w:
        for utt in utts[:6]:
            w.add(utt)
        w.reject("bad/1", "bad.wav", "too short")
    # an interrupted run: a shard renamed but never logged, a temporary file, a torn ledger line
    (tmp_path / "shards" / "shard-00007.array_record").write_bytes(b"junk")
    (tmp_path / "shards" / "shard-00008.array_record.tmp").write_bytes(b"junk")
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('{"shard": "shard-00009.array_rec')
    with DatasetWriter(tmp_path, SETTINGS, shard_size=4) as w:
        assert not (tmp_path / "shards" / "shard-00007.array_record").exists()
        assert not (tmp_path / "shards" / "shard-00008.array_record.tmp").exists()
        todo = [u for u in utts if not w.is_done(u.id)]
        assert [u.id for u in todo] == [u.id for u in utts[6:]] and w.is_done("bad/1")
        for utt in todo:
            w.add(utt)
    meta = load_metadata(tmp_path)
    assert meta["counts"]["train"] + meta["counts"]["eval"] == 10 and meta["counts"]["rejected"] == 1
    with pytest.raises(DatasetError, match="tokenizer"):
        DatasetWriter(tmp_path, {**SETTINGS, "tokenizer": "naive"})
    with DatasetWriter(tmp_path, SETTINGS):
        with pytest.raises(DatasetError, match="lock"):
            DatasetWriter(tmp_path, SETTINGS)


# ----------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("version", [5, 2])
def test_static_shapes_and_token_budget(dataset, version):
    root, utts = dataset
    cfg = config(root, ModelConfig(resp_levels=8, version=version, arch_type="retnet" if version == 2 else "llama"))
    p = DataPipeline(cfg)
    extra = extra_rows(cfg.model)
    assert extra == (4 if version == 5 else 2)
    assert len(p.buckets) >= 2
    for b in p.buckets:
        assert b.batch * b.rows <= cfg.data.batch_tokens and b.batch <= cfg.data.max_batch
        assert b.prom <= int(np.ceil(1.5 * 75)) + 7  # arrays padded to the longest member prompt (a multiple of 8)
    assert p.dropped == 1  # the 1400-frame utterance
    allowed = {tuple(sorted(b.shapes(8).items())) for b in p.buckets}
    seen = set()
    for batch in take(iter(p.dataset()), 2 * p.plan.per_epoch):
        shapes = tuple(sorted((k, v.shape) for k, v in batch.items()))
        assert shapes in allowed
        seen.add(shapes)
        assert all(v.dtype == np.int32 for v in batch.values())
        # every item fits its padded arrays, and its whole sequence fits the bucket's rows (no fixed prompt segment)
        assert (batch["text_len"] <= batch["text"].shape[1]).all() and (batch["resp_len"] <= batch["resp"].shape[1]).all()
        assert (batch["prom_len"] <= batch["prom"].shape[1]).all()
        total = batch["text_len"] + batch["prom_len"] + batch["resp_len"] + extra
        assert (total <= batch["rows"]).all() and len(set(batch["rows"].tolist())) == 1
    assert len(seen) == len(p.buckets)


def test_buckets_prefer_small_rows():
    """An utterance goes to the smallest bucket that holds text + its own prompt + response + stop + 4 rows; the
    arrays of a bucket are padded to its members' longest text/prompt/response (multiples of 8)."""
    m = ModelConfig()
    cfg = DataConfig(length_buckets=[200, 400], batch_tokens=1600, max_batch=64, frames_per_second=75)
    t = np.array([20, 20, 30, 60, 20, 20])
    r = np.array([90, 80, 200, 200, 1000, 90])
    p = np.array([75, 40, 100, 40, 10, 100])  # prompts of their own length: the last one no longer fits 200 rows
    buckets, assign = plan_buckets(t, r, p, m, cfg)
    assert assign.tolist() == [0, 0, 1, 1, -1, 1]  # 20 + 75 + 91 + 4 = 190 <= 200; 20 + 100 + 91 + 4 = 215 > 200
    assert [b.batch for b in buckets] == [8, 4] and [b.rows for b in buckets] == [200, 400]
    assert (buckets[0].text, buckets[0].prom, buckets[0].resp) == (24, 80, 96)
    assert (buckets[1].text, buckets[1].prom, buckets[1].resp) == (64, 104, 208)


def test_prompt_lengths_follow_the_duration_range():
    """Each utterance draws its prompt length once, uniformly in prompt_duration_range (in frames), reproducibly."""
    from valle_jax.data.batching import prompt_frames

    cfg = DataConfig(prompt_duration_range=[3.0, 6.0], frames_per_second=75, seed=4)
    n = prompt_frames(np.arange(4000), cfg)
    assert n.min() >= 225 and n.max() <= 450 and abs(n.mean() - 337.5) < 5
    assert np.array_equal(n, prompt_frames(np.arange(4000), cfg))
    assert not np.array_equal(n, prompt_frames(np.arange(4000), DataConfig(prompt_duration_range=[3.0, 6.0], frames_per_second=75)))


def test_assemble_matches_training_batch():
    m = ModelConfig()
    rng = np.random.default_rng(3)
    bucket = plan_buckets(np.array([12]), np.array([40]), np.array([20]), m, DataConfig(frames_per_second=75, length_buckets=[256]))[0][0]
    items, proms, texts, resps = [], [], [], []
    for n in (20, 31, 40):
        t = rng.integers(0, 256, size=n // 3)
        p = rng.integers(0, 1024, size=(n // 2, 8))
        r = rng.integers(0, 1024, size=(n, 8))
        items.append({"text": t, "prom": p, "resp": r})
        texts.append(t), proms.append(p), resps.append(r)
    levels = [0, 3, 0]
    ours = assemble(bucket, texts, proms, resps, levels, 8, m.stop_token)
    ref = training_batch(m, items, levels, {"text": bucket.text, "prom": bucket.prom, "resp": bucket.resp})
    assert ours.pop("rows").tolist() == [256] * 3
    for k in ours:
        assert np.array_equal(ours[k], np.asarray(getattr(ref, k))), k


# ----------------------------------------------------------------------------------------------- pipeline


def _speaker(u: int, utts: list[Utterance]) -> str:
    return utts[u - 1].speaker


def test_prompts_same_speaker_never_itself(dataset):
    root, utts = dataset
    cfg = config(root)
    p = DataPipeline(cfg)
    prompts_of: dict[int, set] = {}
    n_multi = 0
    for batch in take(iter(p.dataset()), 3 * p.plan.per_epoch):
        for i in range(len(batch["level"])):
            u = int(batch["resp"][i, 0, 0])
            assert int(batch["text"][i, 1]) == u % 256  # the text belongs to the same utterance
            n = int(batch["prom_len"][i])
            if _speaker(u, utts) == "s9":  # the only utterance of its speaker: no prompt
                assert n == 0
                continue
            assert 1 <= n <= batch["prom"].shape[1]
            assert n >= int(0.5 * 75) - 1
            sources = batch["prom"][i, :n, 0]
            assert u not in sources
            assert {_speaker(int(s), utts) for s in sources} == {_speaker(u, utts)}
            assert (batch["prom"][i, n:] == 0).all()
            n_multi += len(set(sources.tolist())) > 1
            # each piece is a contiguous window of its source utterance (frame counter in level 1)
            for s in set(sources.tolist()):
                fr = batch["prom"][i, :n, 1][sources == s]
                assert (np.diff(fr) % 1024 == 1).all()  # the counter is frame % 1024 (make_utt)
            prompts_of.setdefault(u, set()).add((tuple(sources.tolist()), int(batch["prom"][i, 0, 1])))
    assert n_multi > 0  # some prompts concatenate several utterances (max_prompts 3)
    assert sum(len(v) > 1 for v in prompts_of.values()) > 0.8 * len(prompts_of)  # prompts differ between epochs


def test_levels_follow_the_multiset_and_stop_token(dataset):
    root, _ = dataset
    cfg = config(root, batch_tokens=8192, max_batch=32)
    p = DataPipeline(cfg)
    counts = Counter()
    for batch in take(iter(p.dataset()), 60):
        for i, lv in enumerate(batch["level"].tolist()):
            counts[lv] += 1
            u = int(batch["resp"][i, 0, 0])
            n = int(batch["resp_len"][i])
            if lv == 0:
                assert batch["resp"][i, n - 1, 0] == 1024 and batch["resp"][i, n - 2, 0] == u
            else:
                assert batch["resp"][i, n - 1, 0] == u and batch["resp"][i, n, 0] == 0
    total = sum(counts.values())
    expect = {i: (8 - i) / 36 for i in range(8)}
    assert set(counts) <= set(expect)
    for lv, pr in expect.items():
        sd = np.sqrt(pr * (1 - pr) / total)
        assert abs(counts[lv] / total - pr) < 5 * sd + 1e-3, (lv, counts[lv] / total, pr)
    # NAR-only model: level 0 is never drawn
    cfg = dataclasses.replace(cfg, model=ModelConfig(capabilities=["nar"]))
    levels = np.concatenate([b["level"] for b in take(iter(DataPipeline(cfg).dataset()), 20)])
    assert levels.min() >= 1 and set(levels.tolist()) == set(range(1, 8))


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_are_disjoint_and_cover(dataset, count):
    root, utts = dataset
    cfg = config(root, batch_multiple=count)  # so that one process sees the same global batches as `count`
    whole = DataPipeline(cfg)
    parts = [DataPipeline(cfg, "train", i, count) for i in range(count)]
    assert [b.batch for b in whole.buckets] == [b.batch for b in parts[0].buckets]
    assert all(b.batch % count == 0 for b in whole.buckets)
    seen = Counter()
    for k in range(whole.plan.per_epoch):
        g = whole.batch(k)
        sl = [p.batch(k) for p in parts]
        for key in g:
            assert np.array_equal(np.concatenate([s[key] for s in sl]), g[key]), key
        for s in sl:
            seen.update(int(x) for x in s["resp"][:, 0, 0])
    train_ids = {int(i.split("u")[-1]) for spk in load_metadata(root)["splits"]["train"].values() for i in spk["ids"]}
    assert set(seen) == train_ids - {len(utts) - 1}  # every train utterance but the too-long one, per epoch


def test_epochs_reshuffle_and_seed(dataset):
    root, _ = dataset
    p = DataPipeline(config(root))
    order = lambda e: [tuple(r) for r in p.plan.epoch(e)[1]]  # noqa: E731
    assert order(0) != order(1)
    assert order(0) == [tuple(r) for r in BatchPlan(_assign(p), p.buckets, 0, True).epoch(0)[1]]
    other = DataPipeline(config(root, seed=1))
    assert [tuple(r) for r in other.plan.epoch(0)[1]] != order(0)


def _assign(p: DataPipeline) -> np.ndarray:
    a = np.full(len(p.items), -1)
    for k, m in enumerate(p.plan.members):
        a[m] = k
    return a


def test_iterator_state_restores_the_same_batches(dataset):
    root, _ = dataset
    cfg = config(root)
    it = make_iterator(cfg)
    take(it, 5)
    state = it.get_state()
    want = take(it, 6)
    it2 = make_iterator(cfg)
    it2.set_state(json.loads(json.dumps(state)))
    assert same(take(it2, 6), want)
    # across an epoch boundary, too
    it3 = make_iterator(cfg)
    per_epoch = DataPipeline(cfg).plan.per_epoch
    it3.set_state({**state, "next_index": per_epoch - 2})
    a = take(it3, 4)
    it4 = make_iterator(cfg)
    it4.set_state({**state, "next_index": per_epoch - 2})
    assert same(take(it4, 4), a)


def test_iterator_checkpoint_with_orbax(dataset, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    root, _ = dataset
    cfg = config(root)
    it = make_iterator(cfg)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = take(it, 4)
        it2 = make_iterator(cfg)
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
        assert same(take(it2, 4), want)


def test_eval_split_is_one_deterministic_pass(dataset):
    root, utts = dataset
    cfg = config(root)
    a = list(make_iterator(cfg, "eval"))
    b = list(make_iterator(cfg, "eval"))
    assert same(a, b) and len(a) == DataPipeline(cfg, "eval").plan.per_epoch
    eval_ids = {int(i.split("u")[-1]) for spk in load_metadata(root)["splits"]["eval"].values() for i in spk["ids"]}
    got = {int(x) for batch in a for x in batch["resp"][:, 0, 0]}
    assert got == eval_ids - {len(utts) - 1}
    # eval prompts come from the same speaker (train utterances allowed), never the utterance itself
    for batch in a:
        for i in range(len(batch["level"])):
            u, n = int(batch["resp"][i, 0, 0]), int(batch["prom_len"][i])
            src = set(batch["prom"][i, :n, 0].tolist())
            assert u not in src and {_speaker(s, utts) for s in src} <= {_speaker(u, utts)}


def test_bad_inputs(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(ValueError, match="synthetic"):
        make_iterator(config(root, path="synthetic"))
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        make_iterator(config(tmp_path))
    with pytest.raises(DatasetError, match="bucket"):
        DataPipeline(config(root, length_buckets=[64]))
    cfg = config(root, ModelConfig(resp_levels=9))
    with pytest.raises(DatasetError, match="levels"):
        DataPipeline(cfg)


def test_batch_multiple(dataset):
    root, _ = dataset
    p = DataPipeline(config(root, batch_multiple=4), "train", 0, 2)
    assert all(b.batch % 4 == 0 for b in p.buckets)
    bucket, _, _ = p.batch_items(0)
    assert all(v.shape[0] == bucket.batch // 2 for v in p.batch(0).values())


@pytest.mark.slow
def test_grain_worker_processes(dataset, tmp_path):
    """num_workers > 0 runs batch assembly in grain worker processes (absl flags parsed for them); the batches
    and the iterator state are those of the in-process pipeline. Runs in a fresh interpreter, as a trainer would."""
    root, _ = dataset
    script = tmp_path / "run.py"
    script.write_text(f"""
import json, sys, numpy as np
sys.path[:0] = [{str(Path(__file__).resolve().parents[1])!r}, {str(Path(__file__).resolve().parent)!r}]
from test_data import config, take, same
from valle_jax.data.pipeline import make_iterator
if __name__ == "__main__":
    root = {str(root)!r}
    a = take(make_iterator(config(root, num_workers=2)), 7)
    b = take(make_iterator(config(root)), 7)
    it = make_iterator(config(root, num_workers=2)); take(it, 3); st = it.get_state()
    it2 = make_iterator(config(root, num_workers=2)); it2.set_state(st)
    c = take(it2, 4)
    print(json.dumps({{"same": same(a, b), "resume": same(c, b[3:])}}))
""")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"same": True, "resume": True}


def test_rejected_file_format(tmp_path):
    with DatasetWriter(tmp_path, SETTINGS) as w:
        w.reject("a", "/x/a.wav", "silent")
    assert read_jsonl(tmp_path / "rejected.jsonl") == [{"id": "a", "file": "/x/a.wav", "reason": "silent"}]
