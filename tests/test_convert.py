"""Import/export of reference checkpoints: bit-exact round trips and clear refusals."""

import json
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import ALL_VARIANTS, ROOT, fixture_paths, heads_of
from valle_jax.checkpoint import load_model_dir, save_model_dir
from valle_jax.convert import (
    CheckpointError,
    export_reference,
    load_reference,
    read_reference,
    read_safetensors,
    read_safetensors_metadata,
    write_safetensors,
)


def _same_tensors(a: dict, b: dict):
    assert list(a) == list(b), "keys or key order differ"
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def _import(src, dst, heads=None):
    cfg, params, reference = load_reference(src, heads=heads or heads_of(src))
    save_model_dir(dst, cfg, params, reference)
    return cfg


def _raw_pth(path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in obj.items() if k != "module"}


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_round_trip_same_container_is_bit_exact(name, tmp_path):
    src, _ = fixture_paths(name)
    _import(src, tmp_path / "model")
    dst = tmp_path / f"back{src.suffix}"
    export_reference(tmp_path / "model", dst)
    orig, meta_o, _ = read_reference(src)
    back, meta_b, _ = read_reference(dst)
    _same_tensors(orig, back)
    if src.suffix == ".sft":
        assert read_safetensors_metadata(dst) == read_safetensors_metadata(src)  # the JSON strings, verbatim
    else:
        assert _raw_pth(dst) == _raw_pth(src)


@pytest.mark.parametrize("name", ["llama_v5_split_sums_nonunified", "ar_llama_1"])
def test_round_trip_other_container_and_dtype(name, tmp_path):
    src, _ = fixture_paths(name)
    _import(src, tmp_path / "model")
    other = ".pth" if src.suffix == ".sft" else ".sft"
    dst = tmp_path / f"x{other}"
    export_reference(tmp_path / "model", dst)
    orig, meta_o, _ = read_reference(src)
    back, meta_b, _ = read_reference(dst)
    _same_tensors(orig, back)
    assert meta_b == meta_o  # decoded metadata carried across containers
    # a chosen dtype: bf16 -> fp32 is exact; going back down gives the same bits
    f32 = tmp_path / "f32.sft"
    export_reference(tmp_path / "model", f32, "float32")
    t32, _, _ = read_reference(f32)
    assert all(v.dtype == np.float32 for v in t32.values())
    for k in orig:
        np.testing.assert_array_equal(t32[k], orig[k].astype(np.float32))
    _import(f32, tmp_path / "model32", heads=2)  # heads cannot be read from weights (no manifest beside it)
    bf = tmp_path / "bf16.sft"
    export_reference(tmp_path / "model32", bf, "bfloat16")
    _same_tensors(orig, read_reference(bf)[0])


def test_model_dir_loads_with_config(tmp_path):
    src, _ = fixture_paths("llama_v5_split_sums_nonunified")
    cfg = _import(src, tmp_path / "m")
    cfg2, params, ref = load_model_dir(tmp_path / "m")
    assert cfg2 == cfg and cfg2.experimental.audio_embedding_sums and not cfg2.experimental.unified_position_ids
    assert params["sep"].dtype == ml_dtypes.bfloat16
    assert ref["container"] == "sft"


def test_cli_import_export(tmp_path):
    src, _ = fixture_paths("nar_llama_8")
    run = lambda *a: subprocess.run([sys.executable, "-m", "valle_jax.convert", *a], capture_output=True, text=True, cwd=ROOT)  # noqa: E731
    r = run("import", str(src), str(tmp_path / "m"), "--heads", "2")
    assert r.returncode == 0, r.stderr
    assert "2 heads" in r.stdout
    r = run("import", str(src), str(tmp_path / "m"), "--heads", "2")
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run("export", str(tmp_path / "m"), str(tmp_path / "o.sft"), "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    t, _, _ = read_reference(tmp_path / "o.sft")
    assert {v.dtype for v in t.values()} == {np.dtype(np.float16)}


# ----- refusals: each names the file and the key, and leaves nothing behind -----


def _tensors_meta(name):
    src, _ = fixture_paths(name)
    tensors, meta = read_safetensors(src)
    return src, tensors, meta


def _refuses(tmp_path, path, *needles):
    out = tmp_path / "out_model"
    with pytest.raises(CheckpointError) as e:
        cfg, params, ref = load_reference(path, heads=2)  # the copies have no manifest beside them
        save_model_dir(out, cfg, params, ref)
    msg = str(e.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, msg
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out_model")] == []
    # and through the CLI: exit 2, one line naming the file, no output directory
    r = subprocess.run([sys.executable, "-m", "valle_jax.convert", "import", str(path), str(out), "--heads", "2"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and str(path) in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()
    return msg


def test_refuses_missing_file(tmp_path):
    _refuses(tmp_path, tmp_path / "nope.sft", "not found")


def test_refuses_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.sft"
    p.write_text("these are not weights\n" * 10)
    _refuses(tmp_path, p, "not a checkpoint")
    q = tmp_path / "junk.pth"
    q.write_bytes(b"\x00garbage" * 100)
    _refuses(tmp_path, q, "not a readable PyTorch checkpoint")
    r = tmp_path / "weights.bin"
    r.write_bytes(b"x")
    _refuses(tmp_path, r, "expected a .sft")


def test_refuses_truncated_files(tmp_path):
    src, _ = fixture_paths("llama_v5_split_nosums_nonunified")
    data = src.read_bytes()
    p = tmp_path / "cut.sft"
    p.write_bytes(data[: len(data) - 1000])
    _refuses(tmp_path, p, "truncated")
    src_pth, _ = fixture_paths("ar_llama_1")
    q = tmp_path / "cut.pth"
    q.write_bytes(src_pth.read_bytes()[:50000])
    _refuses(tmp_path, q, "truncated")


def test_refuses_unknown_missing_and_misshapen_keys(tmp_path):
    src, tensors, meta = _tensors_meta("llama_v5_split_nosums_nonunified")
    extra = dict(tensors, **{"foo.weight": np.zeros((2, 2), np.float32)})
    write_safetensors(tmp_path / "extra.sft", extra, meta)
    _refuses(tmp_path, tmp_path / "extra.sft", "unknown key 'foo.weight'")
    extra_layer = dict(tensors, **{"model.layers.0.self_attn.rotary_emb.weight": np.zeros((2,), np.float32)})
    write_safetensors(tmp_path / "extra2.sft", extra_layer, meta)
    _refuses(tmp_path, tmp_path / "extra2.sft", "unknown key 'model.layers.0.self_attn.rotary_emb.weight'")
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    write_safetensors(tmp_path / "missing.sft", missing, meta)
    _refuses(tmp_path, tmp_path / "missing.sft", "missing key", "model.layers.1.mlp.up_proj.weight")
    bad = dict(tensors)
    bad["model.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "shape.sft", bad, meta)
    _refuses(tmp_path, tmp_path / "shape.sft", "'model.layers.0.self_attn.q_proj.weight'", "[32, 31]", "expected [32, 32]")


def test_refuses_unsupported_version_and_arch(tmp_path):
    src, tensors, meta = _tensors_meta("llama_v5_split_nosums_nonunified")
    v4 = dict(tensors, **{"proms_emb.weight.0": np.ones((1,), np.float32)})
    write_safetensors(tmp_path / "v4.sft", v4, meta)
    _refuses(tmp_path, tmp_path / "v4.sft", "version 4", "proms_emb.weight")
    cfg = json.loads(meta["config"])
    cfg["arch_type"] = "mamba"
    write_safetensors(tmp_path / "mamba.sft", tensors, dict(meta, config=json.dumps(cfg)))
    _refuses(tmp_path, tmp_path / "mamba.sft", "arch_type 'mamba'")
    cfg = json.loads(meta["config"])
    cfg["capabilities"] = ["ar", "nar", "len"]
    write_safetensors(tmp_path / "len.sft", tensors, dict(meta, config=json.dumps(cfg)))
    _refuses(tmp_path, tmp_path / "len.sft", "capabilities")


def test_export_refuses_bad_target(tmp_path):
    src, _ = fixture_paths("ar_llama_1")
    _import(src, tmp_path / "m")
    with pytest.raises(CheckpointError, match="o.bin"):
        export_reference(tmp_path / "m", tmp_path / "o.bin")
    with pytest.raises(CheckpointError, match="float8"):
        export_reference(tmp_path / "m", tmp_path / "o.sft", "float8")
    assert not (tmp_path / "o.sft").exists() and not (tmp_path / "o.bin").exists()


def test_safetensors_header_is_standard(tmp_path):
    """Files we write are read by the stock safetensors library too (what the reference uses)."""
    from safetensors import safe_open

    src, _ = fixture_paths("llama_v5_single_unified")  # float32: readable by the numpy backend
    _import(src, tmp_path / "m")
    export_reference(tmp_path / "m", tmp_path / "o.sft")
    with safe_open(str(tmp_path / "o.sft"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        t = f.get_tensor("sep")
    assert set(keys) == set(read_reference(src)[0]) and json.loads(meta["config"])["name"] == "ar+nar"
    np.testing.assert_array_equal(t.numpy(), read_reference(src)[0]["sep"])
    (n,) = struct.unpack("<Q", (tmp_path / "o.sft").read_bytes()[:8])
    assert n % 8 == 0
