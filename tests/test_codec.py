"""valle_jax.codec: the torch codec sidecar, weights lookup, .enc/.dac files and wav I/O.

The sidecar tests run real codecs in random-weight mode (no pretrained weights can be fetched here).  They
need encodec (+ a working torchaudio, see valle_jax/codec/__init__.py), vocos and DAC; they fail when those
packages are absent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from valle_jax.codec import (
    CodecClient,
    CodecCrashError,
    CodecError,
    CodecFileError,
    CodecTimeoutError,
    MissingWeightsError,
    WeightsChecksumError,
    read_audio,
    read_codes,
    write_codes,
    write_wav,
)

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"  # copied from ../shared/reference

HAS_ENCODEC = importlib.util.find_spec("encodec") is not None
HAS_VOCOS = importlib.util.find_spec("vocos") is not None
HAS_DAC = importlib.util.find_spec("dac") is not None
needs_encodec = pytest.mark.codec  # marks the sidecar tests; every codec is part of the set-up: a missing one fails, never skips


def _clips(rate: int = 24000) -> list[np.ndarray]:
    """A few short clips: noise, a chirp, and a 1-sample clip."""
    rng = np.random.default_rng(1234)
    t = np.arange(int(0.3 * rate)) / rate
    chirp = (0.5 * np.sin(2 * np.pi * (200 + 800 * t) * t)).astype(np.float32)
    noise = (0.2 * rng.standard_normal(int(0.12 * rate))).astype(np.float32)
    return [chirp, noise, np.array([0.25], np.float32)]


# --------------------------------------------------------------------------------------- sidecar (EnCodec)


@pytest.fixture(scope="module")
def codec():
    assert HAS_ENCODEC, "encodec is not installed: run tools/setup.sh"
    with CodecClient("encodec", random_seed=0, max_restarts=5, batch_size=4) as client:
        yield client


@pytest.fixture(scope="module")
def reference_codes(codec):
    return codec.encode(_clips(), 24000)


@needs_encodec
def test_encode_shapes_and_codes_vary(codec, reference_codes):
    clips = _clips()
    assert codec.info["kind"] == "encodec" and codec.info["sample_rate"] == 24000
    for clip, codes in zip(clips, reference_codes):
        assert codes.dtype == np.int16
        assert codes.shape == (math.ceil(clip.shape[0] / 320), 8)
        assert codes.min() >= 0 and codes.max() < 1024
    chirp = reference_codes[0]
    # random codebooks are seeded so that codes vary over time and across levels (not all 0)
    assert all(len(np.unique(chirp[:, level])) > 3 for level in range(8))
    assert not np.array_equal(reference_codes[0][:5], reference_codes[1][:5])


@needs_encodec
def test_encode_resamples_to_24k(codec):
    clip = _clips(16000)[0]  # 4800 samples at 16 kHz -> 7200 at 24 kHz -> 23 frames
    [codes], [(codes_m, meta)] = codec.encode([clip], 16000), codec.encode([clip], 16000, return_metadata=True)
    assert codes.shape == (math.ceil(clip.shape[0] * 24000 / 16000 / 320), 8) == (codec.frames_for(4800, 16000), 8)
    np.testing.assert_array_equal(codes, codes_m)
    assert meta == {"original_length": 4800, "sample_rate": 16000}


@needs_encodec
def test_decode_lengths_batching_and_async(codec, reference_codes):
    audio = codec.decode(reference_codes)
    assert [a.shape[0] for a in audio] == [c.shape[0] * 320 for c in reference_codes]
    assert all(a.dtype == np.float32 and np.all(np.isfinite(a)) for a in audio)
    assert np.abs(audio[0]).max() > 0
    # EnCodec's decoder is causal: decoding in a padded batch equals decoding alone
    [alone] = codec.decode([reference_codes[1]])
    np.testing.assert_allclose(alone, audio[1], atol=1e-5)
    # async: returns at once, results in submission order, trimming by lengths
    first = codec.decode_async(reference_codes[:2], lengths=[1000, None])
    second = codec.decode_async(reference_codes[2:])
    got = first.result(timeout=60) + second.result(timeout=60)
    assert [g.shape[0] for g in got] == [1000, reference_codes[1].shape[0] * 320, 320]
    np.testing.assert_allclose(got[0], audio[0][:1000], atol=1e-5)


@needs_encodec
def test_bad_requests(codec):
    with pytest.raises(ValueError, match="shape"):  # more levels than the codec has (fewer are decoded as given)
        codec.decode([np.zeros((4, 9), np.int16)])
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        codec.decode([np.full((4, 8), 1024)])
    with pytest.raises(TypeError):
        codec.decode(np.zeros((4, 8), np.int16))
    with pytest.raises(ValueError, match="mono"):
        codec.encode([np.zeros((2, 100), np.float32)], 24000)
    # an error raised inside the sidecar comes back as CodecError and the sidecar keeps serving
    pid = codec.pid
    with pytest.raises(CodecError, match="unknown request"):
        codec._submit(codec._request, "no-such-op", None, None).result()
    assert codec.pid == pid and codec.ping() == pid


@needs_encodec
def test_hung_sidecar_times_out(codec, reference_codes):
    pid = codec.ping()
    os.kill(pid, signal.SIGSTOP)  # a real hang: the process stops answering
    try:
        start = time.monotonic()
        with pytest.raises(CodecTimeoutError, match="gave no answer .* within 1.5 s; it was killed"):
            codec.decode(reference_codes[:1], timeout=1.5)
        assert time.monotonic() - start < 10
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not codec.is_alive()


@needs_encodec
def test_dead_sidecar_restarts_and_killed_request_fails(codec, reference_codes):
    # the previous test left the sidecar dead: the next request starts a fresh one, which (same seed) gives
    # the same codes
    assert not codec.is_alive()
    restarts = codec.restarts
    again = codec.encode(_clips(), 24000)
    assert codec.is_alive() and codec.restarts == restarts + 1
    for a, b in zip(again, reference_codes):
        np.testing.assert_array_equal(a, b)
    # killed (os.kill) while a request is in flight: the future fails at once with CodecCrashError
    long_codes = [np.tile(reference_codes[0], (20, 1))]  # ~9 s of audio: takes a while on a CPU
    pid = codec.pid
    start = time.monotonic()
    future = codec.decode_async(long_codes)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(CodecCrashError, match=r"died during the decode request \(killed by SIGKILL\)"):
        future.result(timeout=30)
    assert time.monotonic() - start < 15
    assert not codec.is_alive()


@needs_encodec
def test_no_restart_when_disabled():
    # auto_restart=False: a dead sidecar is reported, not replaced (no need to start one to show it)
    client = CodecClient("encodec", random_seed=0, auto_restart=False)
    client._spawned = True  # as if its sidecar had run and died
    with pytest.raises(CodecCrashError, match="auto_restart is off"):
        client.ping()
    client.close()
    with pytest.raises(CodecError, match="closed"):
        client.ping()


# --------------------------------------------------------------------------------------- weights


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(MissingWeightsError) as err:
        CodecClient("encodec")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "encodec_24khz-d7cc33bc.th"
    assert str(expected) in str(err.value) and "random_seed" in str(err.value)
    assert err.value.path == str(expected)

    with pytest.raises(MissingWeightsError, match=r"nope\.th"):
        CodecClient("encodec", weights=tmp_path / "nope.th")
    with pytest.raises(MissingWeightsError, match="config.yaml"):
        CodecClient("vocos", weights=tmp_path)
    with pytest.raises(MissingWeightsError, match="vocos-encodec-24khz"):
        CodecClient("vocos")
    (tmp_path / "config.yaml").write_text("x")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")  # a stand-in: its checksum is not checked here
    monkeypatch.setenv("VALLE_JAX_UNVERIFIED_CODEC_WEIGHTS", "1")
    with pytest.raises(MissingWeightsError, match="encodec_24khz-d7cc33bc.th"):  # vocos needs EnCodec too
        CodecClient("vocos", weights=tmp_path)
    monkeypatch.delenv("VALLE_JAX_UNVERIFIED_CODEC_WEIGHTS")
    with pytest.raises(MissingWeightsError, match="weights_44khz_8kbps_0.0.1.pth"):
        CodecClient("dac", weights=tmp_path)

    # a damaged file under the canonical name fails its checksum
    ckpt = expected
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsChecksumError, match="d7cc33bc"):
        CodecClient("encodec")


def test_weights_from_files_load_through_the_real_path(tmp_path, reference_codes, monkeypatch):
    """Checkpoint files in the published layouts (here holding the seed-0 random models) load through the
    pretrained-weights code: EnCodec's .th state dict, Vocos' config.yaml + pytorch_model.bin."""
    import torch
    import yaml
    from valle_jax.codec import _backends

    monkeypatch.setenv("VALLE_JAX_UNVERIFIED_CODEC_WEIGHTS", "1")  # stand-ins, not the published files

    encodec_model = _backends.build_encodec(None, 0)
    vocos_model = _backends.build_vocos(encodec_model, None, None, 0)
    torch.save(encodec_model.state_dict(), tmp_path / "my-encodec.th")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_backends.VOCOS_ENCODEC_24KHZ_CONFIG))
    torch.save(vocos_model.state_dict(), tmp_path / "pytorch_model.bin")
    want = _backends.VocosCodec(encodec_model, vocos_model, 8, "cpu", 4).decode(reference_codes[:2])

    with CodecClient("vocos", weights=tmp_path, encodec_weights=tmp_path / "my-encodec.th") as loaded:
        codes = loaded.encode(_clips()[:2], 24000)
        audio = loaded.decode(codes)
    for a, b in zip(codes, reference_codes):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(audio, want):
        np.testing.assert_allclose(a, b, atol=1e-5)

    bad = tmp_path / "bad.th"
    torch.save({"encoder.nothing": torch.zeros(1)}, bad)
    with pytest.raises(CodecError, match=r"(?s)failed to start.*Missing key"):
        CodecClient("encodec", weights=bad).start()


# --------------------------------------------------------------------------------------- Vocos, DAC


def test_vocos_sidecar_imports_no_torch_in_parent(reference_codes):
    """In a fresh interpreter: a random Vocos client encodes like the seed-0 EnCodec (same encoder) and decodes
    to T * 320 samples, while that interpreter never imports torch or jax."""
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        sys.path.insert(0, {tests!r})
        from test_codec import _clips
        from valle_jax.codec import CodecClient
        if __name__ == "__main__":
            with CodecClient("vocos", random_seed=0) as c:
                codes = c.encode(_clips(), 24000)
                audio = c.decode(codes)
                info = c.info
            print(json.dumps({{"codes": [x.tolist() for x in codes], "lengths": [len(a) for a in audio],
                              "finite": all(bool(np.isfinite(a).all()) for a in audio),
                              "info": info, "torch": "torch" in sys.modules, "jax": "jax" in sys.modules}}))
        """
    ).format(tests=str(Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=Path(__file__).parents[1]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] is False and result["jax"] is False
    assert result["info"]["kind"] == "vocos" and result["info"]["bandwidth_id"] == 2
    for got, want in zip(result["codes"], reference_codes):
        np.testing.assert_array_equal(np.array(got, dtype=np.int16), want)
    assert result["lengths"] == [c.shape[0] * 320 for c in reference_codes] and result["finite"]


def test_dac_weights_file_roundtrip(tmp_path, monkeypatch):
    """A random DAC 44 kHz (seed 0) saved as descript's weights file loads in the sidecar, encodes a clip to
    9 varying levels with the reference's metadata and decodes to T * 512 samples, as the same model here."""
    import torch
    from valle_jax.codec import _backends

    monkeypatch.setenv("VALLE_JAX_UNVERIFIED_CODEC_WEIGHTS", "1")  # a stand-in, not the published file

    model = _backends.build_dac(None, 0)
    model.save(str(tmp_path / "weights.pth"), package=False)
    rate = 44100
    clip = (0.3 * np.sin(2 * np.pi * 330 * np.arange(int(0.1 * rate)) / rate)).astype(np.float32)
    with CodecClient("dac", weights=tmp_path / "weights.pth") as dac:
        [(codes, meta)] = dac.encode([clip], rate, return_metadata=True)
        [audio] = dac.decode([codes])
    assert codes.dtype == np.int16 and codes.shape == (math.ceil(clip.shape[0] / 512), 9)
    assert len(np.unique(codes)) > 3
    assert meta["sample_rate"] == rate and meta["original_length"] == clip.shape[0]
    assert meta["dac_version"] == "1.0.0" and meta["input_db"].shape == (1,)
    assert audio.dtype == np.float32 and audio.shape == (codes.shape[0] * 512,)  # raw decoder output
    [want] = _backends.DacCodec(model, 9, "cpu", 4).decode([codes])
    np.testing.assert_allclose(audio, want, atol=1e-5)
    # a .dac file as the reference writes it, metadata (numpy input_db included) kept
    back, back_meta = read_codes(write_codes(tmp_path / "a.dac", codes, meta), levels=9)
    np.testing.assert_array_equal(back, codes)
    assert back_meta["input_db"].dtype == np.float32 and back_meta["input_db"][0] == meta["input_db"][0]


# --------------------------------------------------------------------------------------- .enc / .dac files


def test_read_reference_qnt_enc():
    codes, meta = read_codes(REFERENCE / "qnt.enc")
    assert codes.dtype == np.int16 and codes.shape == (310, 8)
    raw = np.load(REFERENCE / "qnt.enc", allow_pickle=True)[()]
    np.testing.assert_array_equal(codes, raw["codes"][0].T.astype(np.int16))
    assert meta["sample_rate"] == 24000 and meta["language"] == "en"
    assert codes.min() >= 0 and codes.max() < 1024
    noise, noise_meta = read_codes(REFERENCE / "noise.enc", levels=8)
    assert noise.shape == (1325, 8) and noise_meta == {"original_length": 282540, "sample_rate": 16000}


def test_write_codes_roundtrip_and_atomic(tmp_path):
    codes, meta = read_codes(REFERENCE / "qnt.enc")
    path = write_codes(tmp_path / "sub" / "a.enc", codes, meta)
    raw = np.load(path, allow_pickle=True)[()]
    assert raw["codes"].dtype == np.uint16 and raw["codes"].shape == (1, 8, 310)
    back, back_meta = read_codes(path)
    np.testing.assert_array_equal(back, codes)
    assert back_meta == meta
    write_codes(path, codes[:10], {"sample_rate": 1})  # overwrite in place
    assert read_codes(path)[0].shape == (10, 8)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.enc"]  # no temporary files left
    with pytest.raises(ValueError):
        write_codes(tmp_path / "b.enc", np.full((3, 8), -1))
    assert not (tmp_path / "b.enc").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/valle_jax_codec_pwned",))


def test_bad_code_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_codes(tmp_path / "missing.enc")
    cases = {
        "text.enc": b"hello",
        "truncated.enc": (REFERENCE / "qnt.enc").read_bytes()[:300],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "plain.npy", np.zeros((1, 8, 4), np.uint16))
    np.save(tmp_path / "nocodes.npy", {"metadata": {}}, allow_pickle=True)
    np.save(tmp_path / "shape.npy", {"codes": np.zeros((2, 8, 4), np.uint16)}, allow_pickle=True)
    np.save(tmp_path / "float.npy", {"codes": np.zeros((1, 8, 4), np.float32)}, allow_pickle=True)
    np.save(tmp_path / "evil.npy", np.array({"codes": _Evil()}, dtype=object), allow_pickle=True)
    expected = {
        "text.enc": "not a NumPy",
        "truncated.enc": "cannot unpickle",
        "plain.npy": "expected a pickled dict",
        "nocodes.npy": "no 'codes'",
        "shape.npy": r"expected \[1, n_levels, T\]",
        "float.npy": "integer dtype",
        "evil.npy": "refusing to load global",
    }
    for name, message in expected.items():
        with pytest.raises(CodecFileError, match=message):
            read_codes(tmp_path / name)
    assert not Path("/tmp/valle_jax_codec_pwned").exists()
    with pytest.raises(CodecFileError, match="8 levels, expected 9"):
        read_codes(REFERENCE / "qnt.enc", levels=9)


# --------------------------------------------------------------------------------------- wav I/O


def test_wav_io(tmp_path):
    import soundfile as sf
    rate = 22050
    t = np.arange(rate // 10) / rate
    mono = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = write_wav(tmp_path / "out" / "a.wav", mono, rate)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.wav"]
    wav, sr = read_audio(path)
    assert sr == rate and wav.dtype == np.float32 and wav.shape == mono.shape
    np.testing.assert_allclose(wav, mono, atol=1 / 32767 + 1e-6)
    # clipping for PCM, float subtype kept exactly
    write_wav(path, np.array([2.0, -2.0, 0.5], np.float32), rate)
    np.testing.assert_allclose(read_audio(path)[0], [1.0, -1.0, 0.5], atol=1e-4)
    write_wav(tmp_path / "f.wav", mono, rate, subtype="FLOAT")
    np.testing.assert_array_equal(read_audio(tmp_path / "f.wav")[0], mono)
    # stereo flac: mean of channels, or the first channel
    stereo = np.stack([mono, np.zeros_like(mono)], axis=1)
    sf.write(tmp_path / "s.flac", stereo, rate)
    np.testing.assert_allclose(read_audio(tmp_path / "s.flac")[0], mono / 2, atol=1e-4)
    np.testing.assert_allclose(read_audio(tmp_path / "s.flac", mix="first")[0], mono, atol=1e-4)
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match="soundfile cannot read"):
        read_audio(tmp_path / "junk.wav")
    with pytest.raises(ValueError, match="NaN"):
        write_wav(tmp_path / "n.wav", np.array([np.nan], np.float32), rate)
