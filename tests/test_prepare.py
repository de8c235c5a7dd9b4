"""`python -m valle_jax.prepare`: audio trees and manifests (espeak-ng speech, the seeded random EnCodec
sidecar), resumable reruns, rejected inputs, import of the reference's .enc + metadata JSON and data.h5
formats, the demo corpus.  espeak-ng and the codec sidecar are required: without them these tests fail."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from valle_jax.data.prepare import AudioLimits, prepare_audio, wav_truncation
from valle_jax.data.records import decode_record, load_metadata, read_jsonl
from valle_jax.data.sources import discover
from valle_jax.text import get_tokenizer, phonemize

ROOT = Path(__file__).resolve().parents[1]
LIMITS = AudioLimits(min_duration=0.5, max_duration=10.0)


def espeak(text: str, voice: str = "en-us") -> tuple[np.ndarray, int]:
    """espeak-ng's own wav (22050 Hz) as float32."""
    exe = shutil.which("espeak-ng")
    assert exe, "espeak-ng is required for these tests (apt-get install -y espeak-ng)"
    res = subprocess.run([exe, "-v", voice, "-s", "190", "--stdout", text], capture_output=True, check=True)
    import io

    wav, sr = sf.read(io.BytesIO(res.stdout), dtype="float32")
    return wav, sr


def resample(wav: np.ndarray, sr: int, new: int) -> np.ndarray:
    n = int(round(len(wav) * new / sr))
    return np.interp(np.arange(n) * sr / new, np.arange(len(wav)), wav).astype(np.float32)


GOOD = {  # id: (speaker, text, sample rate, format, voice)
    "spkA/ch1/a1": ("spkA", "The cat sat on the warm mat.", 22050, "wav", "en-us"),
    "spkA/ch1/a2": ("spkA", "A quiet morning by the river.", 16000, "wav", "en-us"),
    "spkA/ch2/a3": ("spkA", "She opened the green door.", 44100, "flac", "en-us"),
    "spkB/ch1/b1": ("spkB", "Bring me the silver key, please.", 24000, "wav", "en-gb"),
    "spkB/ch1/b2": ("spkB", "We walked home after the storm.", 48000, "wav", "en-gb"),
}
BAD = {  # id: expected words in the reason
    "spkA/ch1/truncated": "truncated",
    "spkA/ch1/notaudio": "unreadable",
    "spkB/ch1/short": "too short",
    "spkB/ch1/silent": "silent",
    "spkB/ch1/emptytext": "empty transcript",
    "spkB/ch1/notext": "no transcript",
}


def build_tree(src: Path) -> dict[str, dict]:
    info = {}
    for uid, (spk, text, sr, fmt, voice) in GOOD.items():
        wav, native = espeak(text, voice)
        wav = resample(wav, native, sr) if sr != native else wav
        path = src / f"{uid}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wav, sr, format=fmt.upper(), subtype="PCM_16")
        (src / f"{uid}.normalized.txt").write_text(text + "\n")
        info[uid] = {"speaker": spk, "text": text, "sr": sr, "samples": len(wav), "path": str(path)}
    wav, sr = espeak("This clip will be cut short in the middle of its data.")
    good = src / "spkA/ch1/truncated.wav"
    sf.write(good, wav, sr, subtype="PCM_16")
    good.write_bytes(good.read_bytes()[: 44 + len(wav)])  # header says 2 bytes per sample, half of them are there
    (src / "spkA/ch1/truncated.txt").write_text("This clip will be cut short.")
    (src / "spkA/ch1/notaudio.wav").write_text("I am a text file with a .wav name\n" * 20)
    (src / "spkA/ch1/notaudio.txt").write_text("Not audio at all.")
    sf.write(src / "spkB/ch1/short.wav", wav[: int(0.2 * sr)], sr)
    (src / "spkB/ch1/short.txt").write_text("Short.")
    sf.write(src / "spkB/ch1/silent.wav", np.zeros(sr, np.float32), sr)
    (src / "spkB/ch1/silent.txt").write_text("Nothing is said here.")
    sf.write(src / "spkB/ch1/emptytext.wav", wav, sr)
    (src / "spkB/ch1/emptytext.txt").write_text("  \n")
    sf.write(src / "spkB/ch1/notext.wav", wav, sr)
    return info


def read_records(out: Path) -> dict[str, dict]:
    import grain

    meta = load_metadata(out)
    src = grain.sources.ArrayRecordDataSource([str(out / "shards" / s["name"]) for s in meta["shards"]])
    recs = [decode_record(src[i]) for i in range(len(src))]
    return {r["id"]: r for r in recs}


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("prep")
    info = build_tree(base / "src")
    summary = prepare_audio(base / "src", base / "out", random_codec=0, workers=2, shard_size=2, limits=LIMITS,
                            eval_fraction=0.2, progress=False)  # fmt: skip
    return base, info, summary


def test_prepare_tree_reports_and_skips_bad_files(prepared):
    base, info, summary = prepared
    out = base / "out"
    assert summary["found"] == len(GOOD) + len(BAD)
    assert summary["added"] == len(GOOD) and summary["rejected_now"] == len(BAD)
    rejected = {r["id"]: r for r in read_jsonl(out / "rejected.jsonl")}
    assert set(rejected) == set(BAD)
    for uid, words in BAD.items():
        assert words in rejected[uid]["reason"], rejected[uid]
        assert rejected[uid]["file"].endswith(Path(uid).name + ".wav")
    meta = load_metadata(out)
    assert meta["counts"] == {"train": 4, "eval": 1, "rejected": len(BAD)}
    assert meta["random_codec"] == 0 and "RANDOM" in meta["warning"]
    assert meta["codec"] == "encodec" and meta["levels"] == 8 and meta["frames_per_second"] == 75
    assert set(meta["splits"]["train"]) | set(meta["splits"]["eval"]) == {"spkA", "spkB"}
    assert len(meta["shards"]) == 3  # shard_size 2


def test_prepared_records(prepared):
    base, info, _ = prepared
    recs = read_records(base / "out")
    assert set(recs) == set(GOOD)
    tok = get_tokenizer("bpe")
    for uid, r in recs.items():
        want = info[uid]
        assert r["speaker"] == want["speaker"] and r["text"] == want["text"] and r["language"] == "en"
        assert r["phonemes"] == phonemize(want["text"], "en")
        assert r["text_ids"].tolist() == tok.encode(r["phonemes"])
        assert r["codes"].dtype == np.int16 and r["codes"].shape[1] == 8
        n24 = math.ceil(want["samples"] * 24000 / want["sr"])
        assert r["codes"].shape[0] == math.ceil(n24 / 320), uid
        assert 0 <= r["codes"].min() and r["codes"].max() < 1024 and len(np.unique(r["codes"][:, 0])) > 1
        assert abs(r["duration"] - want["samples"] / want["sr"]) < 1e-3


def test_rerun_is_a_noop(prepared, monkeypatch):
    import valle_jax.data.prepare as prep

    base, _, _ = prepared
    out = base / "out"
    before = snapshot(out)

    def no_codec(*a, **k):
        raise AssertionError("a rerun with nothing to do must not start the codec")

    monkeypatch.setattr(prep, "open_codec", no_codec)
    summary = prepare_audio(base / "src", out, random_codec=0, workers=2, shard_size=2, limits=LIMITS,
                            eval_fraction=0.2, progress=False)  # fmt: skip
    assert summary["added"] == 0 and summary["rejected_now"] == 0 and summary["already_done"] == summary["found"]
    assert snapshot(out) == before


def test_interrupted_run_resumes(prepared, tmp_path):
    """A crash after a shard was renamed but before the ledger line: the rerun deletes the orphan shard and
    redoes exactly its utterances (with the same codes: the random codec is seeded)."""
    base, _, _ = prepared
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    lines = (out / "ledger.jsonl").read_text().splitlines()
    lost = json.loads(lines[-1])
    (out / "ledger.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    (out / "metadata.json").unlink()
    orphan = out / "shards" / lost["shard"]
    assert orphan.exists()
    summary = prepare_audio(base / "src", out, random_codec=0, workers=0, shard_size=2, limits=LIMITS,
                            eval_fraction=0.2, progress=False)  # fmt: skip
    assert summary["added"] == len(lost["items"]) and summary["rejected_now"] == 0
    a, b = read_records(out), read_records(base / "out")
    assert set(a) == set(b)
    for uid in a:
        assert np.array_equal(a[uid]["codes"], b[uid]["codes"]) and np.array_equal(a[uid]["text_ids"], b[uid]["text_ids"])
    meta_a, meta_b = load_metadata(out), load_metadata(base / "out")
    ids = lambda m: {s: sorted(i for v in m["splits"][s].values() for i in v["ids"]) for s in ("train", "eval")}  # noqa: E731
    assert ids(meta_a) == ids(meta_b)


def test_manifest_through_the_cli(prepared, tmp_path):
    base, info, _ = prepared
    a1, b1 = info["spkA/ch1/a1"], info["spkB/ch1/b1"]
    jsonl = tmp_path / "m.jsonl"
    rows = [
        {"id": "one", "audio": a1["path"], "text": a1["text"], "speaker": "alice"},
        {"id": "two", "audio": os.path.relpath(b1["path"], tmp_path), "text": b1["text"], "speaker": "bob",
         "language": "en-gb"},
        {"id": "three", "audio": "missing.wav", "text": "Where is it?", "speaker": "bob"},
    ]  # fmt: skip
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "valle_jax.prepare", "audio", str(jsonl), str(out), "--random-codec", "0",
           "--workers", "0", "--no-progress", "--eval-fraction", "0"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RANDOM" in res.stderr  # said loudly
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["added"] == 2 and summary["rejected_now"] == 2
    rej = {r["id"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    assert "not found" in rej["three"] and any("JSON" in v for v in rej.values())
    recs = read_records(out)
    assert recs["one"]["speaker"] == "alice" and recs["two"]["language"] == "en-gb"
    assert recs["two"]["phonemes"] == phonemize(b1["text"], "en-gb")


def test_csv_manifest_and_tree_discovery(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text('id,path,text,speaker,language\nx1,a.wav,"Hello, world",s1,\nx2,,no audio,s1,en\n,a.wav,t,,en\n')
    items = discover(csv_path)
    assert [i.id for i in items] == ["x1", "x2", "a"]
    assert items[0].audio == str(tmp_path / "a.wav") and items[0].text == "Hello, world" and items[0].language == "en"
    assert items[0].problem is None and "no audio" in items[1].problem and "no speaker" in items[2].problem
    tree = tmp_path / "tree" / "19" / "198"
    tree.mkdir(parents=True)
    (tree / "19_198_1.wav").write_bytes(b"")
    (tree / "19_198_1.normalized.txt").write_text("x")
    (tree / "19_198_1.txt").write_text("y")
    [it] = discover(tmp_path / "tree")
    assert (it.id, it.speaker, it.text) == ("19/198/19_198_1", "19", "x")


def test_wav_truncation_detection(tmp_path):
    p = tmp_path / "a.wav"
    sf.write(p, np.zeros(1000, np.float32), 16000, subtype="PCM_16")
    assert wav_truncation(p) is None
    p.write_bytes(p.read_bytes()[:1000])
    assert "truncated" in wav_truncation(p)
    (tmp_path / "b.flac").write_bytes(b"fLaC")
    assert wav_truncation(tmp_path / "b.flac") is None


def test_missing_codec_weights_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from valle_jax.prepare import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nothing"))
    (tmp_path / "src").mkdir()
    wav, sr = espeak("Hello there.")
    sf.write(tmp_path / "src" / "a.wav", wav, sr)
    (tmp_path / "src" / "a.txt").write_text("Hello there.")
    rc = main(["audio", str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "encodec_24khz-d7cc33bc.th" in err and "--random-codec" in err


# ----------------------------------------------------------------------------------------------- reference formats


def write_enc(path: Path, codes_tq: np.ndarray, metadata: dict) -> None:
    """Exactly what the reference writes: np.save of a pickled dict to a file named .enc/.dac."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, {"codes": codes_tq.T[None].astype(np.uint16), "metadata": metadata})


def test_import_reference_enc_tree(tmp_path):
    from valle_jax.data.reference import import_reference

    rng = np.random.default_rng(0)
    training = tmp_path / "training"
    tok = get_tokenizer("bpe")
    want = {}
    # group LibriTTS, speaker 1034: texts in the speaker metadata JSON
    meta_json = {}
    for i in range(3):
        uid = f"1034_121119_00000{i}_000000"
        codes = rng.integers(0, 1024, size=(80 + 10 * i, 8))
        write_enc(training / "data" / "LibriTTS" / "1034" / f"{uid}.enc", codes,
                  {"original_length": (80 + 10 * i) * 320, "sample_rate": 24000})  # fmt: skip
        ph = ["ˈaɪ wɪl nˌɑːt ˈæsk", "həlˈoʊ wˈɜːld.", "ðɪs ɪz ɐ tˈɛst."][i]
        meta_json[uid] = {"text": f"text {i}", "phonemes": ph, "language": "en", "duration": (80 + 10 * i) / 75}
        want[f"LibriTTS/1034/{uid}"] = (codes, f"text {i}", ph, "LibriTTS_1034")
    (training / "metadata" / "LibriTTS").mkdir(parents=True)
    (training / "metadata" / "LibriTTS" / "1034.json").write_text(json.dumps(meta_json, ensure_ascii=False))
    # speaker 2: a side {id}.json, text in the .enc metadata only, no transcript at all, a corrupt file
    codes = rng.integers(0, 1024, size=(90, 8))
    write_enc(training / "data" / "LibriTTS" / "2" / "side.enc", codes, {"sample_rate": 24000})
    (training / "data" / "LibriTTS" / "2" / "side.json").write_text(
        json.dumps({"text": "side", "phonemes": "sˈaɪd", "language": "en", "duration": 1.2}))
    want["LibriTTS/2/side"] = (codes, "side", "sˈaɪd", "LibriTTS_2")
    codes = rng.integers(0, 1024, size=(70, 8))
    write_enc(training / "data" / "LibriTTS" / "2" / "infile.enc", codes,
              {"text": "Hello world.", "language": "en", "original_length": 0.0133, "sample_rate": 24000})  # fmt: skip
    want["LibriTTS/2/infile"] = (codes, "Hello world.", phonemize("Hello world.", "en"), "LibriTTS_2")
    write_enc(training / "data" / "LibriTTS" / "2" / "notext.enc", codes, {"sample_rate": 24000})
    (training / "data" / "LibriTTS" / "2" / "corrupt.enc").write_bytes(b"\x93NUMPY garbage")
    out = tmp_path / "out"
    summary = import_reference(training, out, eval_fraction=0, progress=False, limits=LIMITS)
    assert summary["added"] == len(want) and summary["rejected_now"] == 2
    rej = {r["id"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    assert "empty transcript" in rej["LibriTTS/2/notext"] and "LibriTTS/2/corrupt" in rej
    recs = read_records(out)
    assert set(recs) == set(want)
    for uid, (codes, text, ph, spk) in want.items():
        r = recs[uid]
        assert np.array_equal(r["codes"], codes.astype(np.int16)) and r["codes"].dtype == np.int16
        assert (r["text"], r["phonemes"], r["speaker"]) == (text, ph, spk)
        assert r["text_ids"].tolist() == tok.encode(ph)
    assert recs["LibriTTS/1034/1034_121119_000001_000000"]["duration"] == pytest.approx(90 / 75)
    # a rerun is a no-op
    before = snapshot(out)
    assert import_reference(training, out, eval_fraction=0, progress=False, limits=LIMITS)["added"] == 0
    assert snapshot(out) == before


def test_import_reference_hdf5(tmp_path, capsys):
    import h5py

    from valle_jax.prepare import main

    rng = np.random.default_rng(1)
    tok = get_tokenizer("bpe")
    path = tmp_path / "data.h5"
    want = {}
    with h5py.File(path, "w") as f:
        f.create_dataset("symmap", data=json.dumps(tok.get_vocab()))
        for kind, spk, n in (("training", "LibriVox/1034", 3), ("validation", "LibriVox/1034", 1), ("training", "Other/7", 2),
                             ("noise", "noise/1", 1)):  # fmt: skip
            for i in range(n):
                uid = f"{kind[:3]}_{i}"
                g = f.create_group(f"{kind}/{spk}/{uid}")
                codes = rng.integers(0, 1024, size=(60 + 7 * i, 8)).astype(np.int16)
                ph = ["həlˈoʊ wˈɜːld.", "ðɪs ɪz ɐ tˈɛst.", "ˈaɪ wɪl nˌɑːt ˈæsk"][i % 3]
                ids = np.asarray(tok.encode(ph), np.uint8)
                g.create_dataset("audio", data=codes, compression="lzf")
                g.create_dataset("text", data=ids, compression="lzf")
                g.attrs["text"] = f"words {i}"
                g.attrs["phonemes"] = ph
                g.attrs["language"] = "en"
                g.attrs["duration"] = codes.shape[0] / 75
                if kind != "noise":
                    want[f"{spk}/{uid}"] = (codes, ids, "train" if kind == "training" else "eval", spk.replace("/", "_"))
        # token ids that are not what the tokenizer would give are kept as stored
        g = f["training/Other/7/tra_1"]
        del g["text"]
        g.create_dataset("text", data=np.array([1, 200, 201, 2], np.uint8), compression="lzf")
        want["Other/7/tra_1"] = (want["Other/7/tra_1"][0], np.array([1, 200, 201, 2], np.uint8), "train", "Other_7")
    out = tmp_path / "out"
    assert main(["reference", str(path), str(out), "--no-progress"]) == 0
    assert "noise" in capsys.readouterr().err
    recs = read_records(out)
    assert set(recs) == set(want)
    meta = load_metadata(out)
    for uid, (codes, ids, split, spk) in want.items():
        r = recs[uid]
        assert np.array_equal(r["codes"], codes) and r["codes"].dtype == np.int16
        assert np.array_equal(r["text_ids"], ids) and r["text_ids"].dtype == np.uint8
        assert r["speaker"] == spk and r["text"].startswith("words")
        assert uid in meta["splits"][split][spk]["ids"]


@pytest.mark.slow
def test_demo_corpus(tmp_path, monkeypatch, capsys):
    """The demo: espeak-ng voices speak generated sentences; without real EnCodec weights the seeded random
    EnCodec encodes them and both the output and the metadata say so; the pipeline reads the result."""
    from valle_jax.config import Config, DataConfig
    from valle_jax.data.pipeline import make_iterator
    from valle_jax.prepare import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--sentences", "8", "--speakers", "2", "--workers", "0", "--no-progress",
                 "--eval-fraction", "0.2"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "SEEDED RANDOM" in err and "RANDOMLY INITIALISED" in err
    meta = load_metadata(out)
    assert meta["random_codec"] == 0 and "RANDOM" in meta["warning"]
    assert meta["counts"]["train"] + meta["counts"]["eval"] == 8 and meta["counts"]["rejected"] == 0
    assert set(meta["splits"]["train"]) == {"us_m3", "us_f2"}
    assert len(list((out / "source").rglob("*.wav"))) == 8
    cfg = Config(data=DataConfig(path=str(out), length_buckets=[512, 1024], batch_tokens=4096, prompt_duration_range=[1.0, 2.0]))
    batch = next(make_iterator(cfg))
    assert batch["resp"].shape[2] == 8 and batch["text"].shape[0] >= 1


def test_codec_failures_reject_the_clip_or_stop_the_run():
    from valle_jax.codec import CodecCrashError, CodecError
    from valle_jax.data.prepare import PrepareError, encode_batch

    class Fake:
        restarts, max_restarts = 0, 3

        def encode(self, waves, rates):
            if any(len(w) == 3 for w in waves):
                raise CodecError("remote error on a bad clip")
            return [np.full((len(w), 8), len(w), np.int16) for w in waves]

    out = encode_batch(Fake(), [np.zeros(2), np.zeros(3), np.zeros(4)], [16000] * 3)
    assert out[0].shape == (2, 8) and out[2][0, 0] == 4 and "codec failed" in out[1]

    class Dying(Fake):
        restarts = 3

        def encode(self, waves, rates):
            raise CodecCrashError("killed")

    with pytest.raises(PrepareError, match="keeps failing"):
        encode_batch(Dying(), [np.zeros(2)], [16000])
