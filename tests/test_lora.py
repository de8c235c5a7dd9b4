"""LoRA: parity with the reference's LoRA fixture, file round trips, refusals, merge, several LoRAs per batch.

Fixture `lora_llama` (tests/fixtures/lora_fixtures.json, made by the reference): a float32 base (dim 64, 4 heads,
2 layers, split heads, sums), a rank-8 / alpha-16 LoRA with random nonzero A and B, and the reference's logits
with the LoRA applied (`logits_L{l}`) and without it (`logits_base_L{l}`). Heads cannot be read from weights:
the manifest says 4.
"""

import json
import subprocess
import sys
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES, ROOT, fixture_paths, heads_of
from valle_jax.convert import CheckpointError, load_any, read_safetensors, write_safetensors
from valle_jax.convert import main as convert_main
from valle_jax.lora_files import read_lora, write_lora
from valle_jax.models.lora import (
    LoraConfig,
    LoraError,
    apply_model,
    init_lora,
    lora_logical_axes,
    lora_targets,
    merge_lora,
    stack_loras,
)
from valle_jax.layout import make_batch
from valle_jax.models.valle import VALLE, head_width, logical_axes

TOL = 2e-5  # as the base parity tests: a correct float32 implementation lands within ~5e-6 here
MANIFEST = json.loads((FIXTURES / "lora_fixtures.json").read_text())["lora_llama"]
BASE = FIXTURES / MANIFEST["checkpoint"]
LORA_SFT = FIXTURES / MANIFEST["lora"]
NPZ = FIXTURES / MANIFEST["npz"]
HEADS = MANIFEST["dims"]["heads"]
LEVELS = MANIFEST["logits_levels"]


@lru_cache(maxsize=None)
def base():
    return load_any(BASE, heads=HEADS)


@lru_cache(maxsize=None)
def ref():
    return dict(np.load(NPZ))


@lru_cache(maxsize=None)
def fixture_lora():
    cfg, params = base()
    lcfg, lp, _ = read_lora(LORA_SFT, cfg, params)
    return lcfg, lp


@lru_cache(maxsize=None)
def forward(cfg):
    """One jitted LoRA forward per config (retraced per batch shape / stack size / static options)."""
    model = VALLE(cfg)

    def run(params, stack, batch, index, train=False, dropout=0.0, strategy=None, rngs=None):
        return apply_model(model, params, stack, index, batch, train=train, dropout=dropout, strategy=strategy, rngs=rngs)[0]

    return jax.jit(run, static_argnames=("train", "dropout", "strategy"))


def item(level, n_text=None, n_prom=None, n_resp=None):
    r = ref()
    return {"text": r["text"][:n_text], "prom": r["prom"][:n_prom], "resp": r["resp"][:n_resp], "level": level}


def logits_of(params, stack, items, index=None, **kw):
    cfg, _ = base()
    out = forward(cfg)(params, stack, make_batch(items), None if index is None else jnp.asarray(index, jnp.int32), **kw)
    return np.asarray(out)


def one(lcfg, lp):
    return stack_loras([(lcfg, lp)], base()[0].resp_levels)


# ---------------------------------------------------------------------------------------------------------
# parity with the reference


def test_parity_with_and_without_lora_sft():
    cfg, params = base()
    r = ref()
    stack = one(*fixture_lora())
    for level in LEVELS:
        w = head_width(cfg, level)
        with_lora = logits_of(params, stack, [item(level)])[0, :, :w]
        without = logits_of(params, None, [item(level)])[0, :, :w]
        assert with_lora.shape == r[f"logits_L{level}"].shape
        assert np.abs(with_lora - r[f"logits_L{level}"]).max() < TOL, level
        assert np.abs(without - r[f"logits_base_L{level}"]).max() < TOL, level
        assert np.abs(r[f"logits_L{level}"] - r[f"logits_base_L{level}"]).max() > 1.0  # the LoRA matters here


def test_parity_with_lora_pth_written_by_our_exporter(tmp_path):
    """The .pth LoRA: the fixture's tensors written by our exporter in the reference's .pth layout (the reference
    made only the .sft); torch itself checks the layout, then the logits match the reference's."""
    cfg, params = base()
    lcfg, lp = fixture_lora()
    pth = write_lora(tmp_path / "lora.pth", lcfg, lp)
    obj = torch.load(pth, map_location="cpu", weights_only=True)
    assert sorted(obj) == ["config", "module"]
    assert obj["config"] == MANIFEST["lora_config"]
    ref_tensors = load_file(str(LORA_SFT))  # the reference's own file, read by safetensors (as its loader does)
    assert sorted(obj["module"]) == sorted(ref_tensors)
    for k, t in ref_tensors.items():
        assert obj["module"][k].dtype == t.dtype and torch.equal(obj["module"][k], t), k
    lcfg2, lp2, _ = read_lora(pth, cfg, params)
    assert lcfg2 == lcfg
    r = ref()
    stack = one(lcfg2, lp2)
    for level in LEVELS:
        got = logits_of(params, stack, [item(level)])[0, :, : head_width(cfg, level)]
        assert np.abs(got - r[f"logits_L{level}"]).max() < TOL, level


def test_pth_with_lora_key_loads(tmp_path):
    """`{"lora": tensors, "config": ...}` (torch.save by hand) is accepted in place of `module`."""
    cfg, params = base()
    tensors = load_file(str(LORA_SFT))
    path = tmp_path / "by_hand.pth"
    torch.save({"lora": tensors, "config": MANIFEST["lora_config"]}, path)
    lcfg, lp, _ = read_lora(path, cfg, params)
    _, lp_sft = fixture_lora()
    assert lcfg.rank == 8 and lcfg.alpha == 16
    for a, b in zip(jax.tree.leaves(lp), jax.tree.leaves(lp_sft)):
        np.testing.assert_array_equal(a, b)


def test_parity_tool_with_lora(tmp_path):
    from tools import parity

    out = tmp_path / "o.npz"
    common = ["--checkpoint", str(BASE), "--inputs", str(NPZ), "--out", str(out), "--heads", str(HEADS)]
    assert parity.main([*common, "--lora", str(LORA_SFT)]) == 0
    got, r = np.load(out), ref()
    assert sorted(got.files) == sorted(f"logits_L{l}" for l in LEVELS)
    for l in LEVELS:
        assert np.abs(got[f"logits_L{l}"] - r[f"logits_L{l}"]).max() < TOL
    assert parity.main(common) == 0  # without --lora: compared against the reference's LoRA-free logits
    got = np.load(out)
    for l in LEVELS:
        assert np.abs(got[f"logits_L{l}"] - r[f"logits_base_L{l}"]).max() < TOL


def test_parity_cli_with_lora_subprocess(tmp_path):
    """The real command line; and the LoRA of the right shapes but other values (a fresh one) exits 1."""
    cmd = [sys.executable, str(ROOT / "tools" / "parity.py"), "--checkpoint", str(BASE), "--inputs", str(NPZ),
           "--out", str(tmp_path / "o.npz"), "--heads", str(HEADS), "--lora", str(LORA_SFT)]  # fmt: skip
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout.strip().splitlines()[-1])
    assert set(report["compared"]) == {f"logits_L{l}" for l in LEVELS}
    assert all(v < TOL for v in report["compared"].values())
    cfg, _ = base()
    fresh = init_lora(cfg, LoraConfig(rank=8, alpha=16), jax.random.key(3))
    other = write_lora(tmp_path / "fresh.sft", LoraConfig(rank=8, alpha=16), jax.tree.map(np.asarray, fresh))
    bad = subprocess.run([*cmd[:-1], str(other)], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr


# ---------------------------------------------------------------------------------------------------------
# files: round trips and refusals


def test_export_import_bit_exact(tmp_path):
    cfg, params = base()
    lcfg, lp, reference = read_lora(LORA_SFT, cfg, params)
    orig, orig_meta = read_safetensors(LORA_SFT)
    sft = write_lora(tmp_path / "back.sft", lcfg, lp, reference)
    back, back_meta = read_safetensors(sft)
    assert list(back) == list(orig)
    for k in orig:
        assert back[k].dtype == orig[k].dtype and back[k].shape == orig[k].shape, k
        assert back[k].tobytes() == orig[k].tobytes(), k
    assert back_meta == orig_meta  # the JSON strings, verbatim
    with safe_open(str(sft), "pt") as f:  # the reader the reference uses
        assert json.loads(f.metadata()["config"]) == MANIFEST["lora_config"]
    # through the other container and back
    pth = write_lora(tmp_path / "x.pth", lcfg, lp, reference)
    lcfg2, lp2, ref2 = read_lora(pth, cfg, params)
    again, again_meta = read_safetensors(write_lora(tmp_path / "again.sft", lcfg2, lp2, ref2))
    assert list(again) == list(orig) and all(again[k].tobytes() == orig[k].tobytes() for k in orig)
    assert json.loads(again_meta["config"]) == json.loads(orig_meta["config"])
    # a changed config is written, not the stale metadata; a chosen dtype casts
    half = write_lora(tmp_path / "half.sft", lcfg.replace(rvq_levels=(1, 2)), lp, reference, dtype="float16")
    t16, m16 = read_safetensors(half)
    assert json.loads(m16["config"])["rvq_levels"] == [1, 2]
    assert all(v.dtype == np.float16 for v in t16.values())
    np.testing.assert_array_equal(t16["model.layers.1.mlp.up_proj.lora_B"], orig["model.layers.1.mlp.up_proj.lora_B"].astype(np.float16))


def _tensors_meta():
    tensors, meta = read_safetensors(LORA_SFT)
    return dict(tensors), dict(meta)


def _refused(tmp_path, name, tensors, meta, match, **kw):
    cfg, params = kw.pop("base", base())
    path = tmp_path / name
    write_safetensors(path, tensors, meta)
    with pytest.raises(CheckpointError, match=match):
        read_lora(path, cfg, params, **kw)


def test_refusals(tmp_path):
    tensors, meta = _tensors_meta()
    cfg, params = base()
    with pytest.raises(CheckpointError, match="not a LoRA file"):
        read_lora(BASE, cfg, params)  # a model checkpoint given as a LoRA
    a, b = tensors["model.layers.0.self_attn.q_proj.lora_A"], tensors["model.layers.0.self_attn.q_proj.lora_B"]
    k_proj = {**tensors, "model.layers.0.self_attn.k_proj.lora_A": a, "model.layers.0.self_attn.k_proj.lora_B": b}
    _refused(tmp_path, "k.sft", k_proj, meta, r"model\.layers\.0\.self_attn\.k_proj is not a LoRA target of this llama model")
    layer9 = {**tensors, "model.layers.9.self_attn.q_proj.lora_A": a, "model.layers.9.self_attn.q_proj.lora_B": b}
    _refused(tmp_path, "l9.sft", layer9, meta, r"model\.layers\.9\.self_attn\.q_proj is not a LoRA target")
    head = {**tensors, "classifiers.proj.0.lora_A": a, "classifiers.proj.0.lora_B": b}
    _refused(tmp_path, "head.sft", head, meta, r"classifiers\.proj\.0 is not a LoRA target")
    norm = {**tensors, "model.norm.lora_A": a, "model.norm.lora_B": b}
    _refused(tmp_path, "norm.sft", norm, meta, r"unknown LoRA target 'model\.norm' \(not a Linear layer\)")
    _refused(tmp_path, "foo.sft", {**tensors, "foo.bar.lora_A": a}, meta, r"unknown LoRA target 'foo\.bar'")
    mixed = {**tensors, "model.norm.weight": np.ones(64, np.float32)}
    _refused(tmp_path, "mixed.sft", mixed, meta, r"key 'model\.norm\.weight' is not a LoRA tensor")
    lone = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.lora_B"}
    _refused(tmp_path, "lone.sft", lone, meta, r"lone\.sft: LoRA params: model\.layers\.1\.mlp\.up_proj has lora_A without lora_B")
    wide = {**tensors, "model.layers.0.mlp.up_proj.lora_B": np.zeros((300, 8), np.float32)}
    _refused(tmp_path, "wide.sft", wide, meta, r"model\.layers\.0\.mlp\.up_proj: adapter maps 64 -> 300 features, the base projection 64 -> 256")
    rank = {**tensors, "model.layers.0.mlp.up_proj.lora_A": np.zeros((4, 64), np.float32)}
    _refused(tmp_path, "rank.sft", rank, meta, r"rank 4, the config says rank 8")
    _refused(tmp_path, "nometa.sft", tensors, {}, r"no 'config' metadata")
    lcfg, _, _ = read_lora(tmp_path / "nometa.sft", cfg, params, config=MANIFEST["lora_config"])  # given explicitly
    assert lcfg.scale == 2.0
    para = {"config": json.dumps({**MANIFEST["lora_config"], "parametrize": True})}
    _refused(tmp_path, "para.sft", tensors, para, r"parametrize = true .* not supported")
    unknown = {"config": json.dumps({**MANIFEST["lora_config"], "colour": "red"})}  # a later reference's field
    write_safetensors(tmp_path / "unknown.sft", tensors, unknown)
    with pytest.warns(UserWarning, match=r"unknown\.sft: config: unknown LoRA config field\(s\) colour ignored"):
        assert read_lora(tmp_path / "unknown.sft", cfg, params)[0].rank == 8
    typed = {"config": json.dumps({**MANIFEST["lora_config"], "rank": "eight"})}
    _refused(tmp_path, "typed.sft", tensors, typed, r"typed\.sft: config: rank = 'eight': expected a positive integer")
    levels = {"config": json.dumps({**MANIFEST["lora_config"], "rvq_levels": [8]})}
    _refused(tmp_path, "levels.sft", tensors, levels, r"rvq_levels entry 8: expected an RVQ level 0 <= level < 8")
    # the right LoRA on a base of another size (dim 32)
    other = load_any(fixture_paths("llama_v5_split_nosums_nonunified")[0], heads=heads_of(fixture_paths("llama_v5_split_nosums_nonunified")[0]))
    with pytest.raises(CheckpointError, match=r"down_proj: adapter maps 256 -> 64 features, the base projection 128 -> 32"):
        read_lora(LORA_SFT, *other)
    with pytest.raises(CheckpointError, match="file not found"):
        read_lora(tmp_path / "missing.sft", cfg, params)


def test_retnet_refuses_llama_lora_and_targets():
    """Targets of the retnet rule, written out by hand; a llama LoRA does not fit a retnet model."""
    cfg, params = load_any(fixture_paths("retnet_v2")[0], heads=heads_of(fixture_paths("retnet_v2")[0]))
    got = sorted(".".join(p) for p in lora_targets(cfg, params))
    want = sorted(f"model.layers_{i}.{m}" for i in range(cfg.n_layers) for m in
                  ("retention.q_proj", "retention.v_proj", "retention.g_proj", "retention.out_proj", "ffn.fc1", "ffn.fc2"))  # fmt: skip
    assert got == want
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj is not a LoRA target of this retnet model \(targets: ffn\.fc1, "):
        read_lora(LORA_SFT, cfg, params)


def test_retnet_lora_applied_equals_merged():
    """The same interception serves the RetNet backbone (biased projections, v/g of width 2 dim): a random LoRA
    applied gives the logits of the merged model, and changes them."""
    cfg, params = load_any(fixture_paths("retnet_v2")[0], heads=heads_of(fixture_paths("retnet_v2")[0]))
    r = np.load(fixture_paths("retnet_v2")[1])
    lcfg = LoraConfig(rank=4, alpha=8)
    lp = init_lora(cfg, lcfg, jax.random.key(0), params)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    lp = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), lp)  # B nonzero
    model = VALLE(cfg)
    run = jax.jit(lambda p, s, b: apply_model(model, p, s, None, b)[0])
    batch = make_batch([{"text": r["text"], "prom": r["prom"], "resp": r["resp"], "level": 1}])
    applied = np.asarray(run(params, stack_loras([(lcfg, lp)], cfg.resp_levels), batch))
    merged = np.asarray(run(merge_lora(params, lp, lcfg), None, batch))
    base_logits = np.asarray(run(params, None, batch))
    assert np.abs(applied - merged).max() < TOL
    assert np.abs(applied - base_logits).max() > 1e-1
    assert np.abs(base_logits[0] - r["logits_L1"]).max() < TOL  # the base itself is the reference's


# ---------------------------------------------------------------------------------------------------------
# init, merge, levels, dropout


def test_fresh_lora_targets_init_and_no_change():
    cfg, params = base()
    fresh = init_lora(cfg, LoraConfig(rank=8, alpha=16), jax.random.key(0), params)
    # the reference's own choice of modules: the keys of its LoRA file
    ref_modules = sorted({k.rsplit(".", 1)[0] for k in read_safetensors(LORA_SFT)[0]})
    ours = sorted(".".join(p).replace("layers_", "layers.") for p in lora_targets(cfg, params))
    assert ours == ref_modules
    assert sorted({m.split(".", 3)[3] for m in ref_modules}) == MANIFEST["lora_targets"]
    for path, (d_in, d_out) in lora_targets(cfg, params).items():
        node = fresh
        for p in path:
            node = node[p]
        a, b = np.asarray(node["lora_A"]), np.asarray(node["lora_B"])
        assert a.shape == (d_in, 8) and b.shape == (8, d_out)
        assert not b.any()  # zero-init B
        bound = 1 / np.sqrt(d_in)  # kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
        assert abs(a.std() - bound / np.sqrt(3)) < 0.2 * bound
    r = ref()
    tripled_a = jax.tree.map(lambda x: 3 * x, fresh)  # B stays 0
    for level in (0, 7):
        got = logits_of(params, one(LoraConfig(rank=8, alpha=16), fresh), [item(level)])
        # B = 0 adds exactly nothing: the same program with another A gives the same bits
        same = logits_of(params, one(LoraConfig(rank=8, alpha=16), tripled_a), [item(level)])
        np.testing.assert_array_equal(same, got)
        # without a LoRA it is another program, whose base products XLA may fuse otherwise (float32 reassociation:
        # on CPU the Dense products are 2-d matmuls, fused with their consumers as XLA chooses)
        want = logits_of(params, None, [item(level)])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.abs(got[0, :, : head_width(cfg, level)] - r[f"logits_base_L{level}"]).max() < TOL


def test_merge_matches_applied_and_reference(tmp_path):
    cfg, params = base()
    lcfg, lp = fixture_lora()
    merged = merge_lora(params, lp, lcfg)
    r = ref()
    stack = one(lcfg, lp)
    for level in LEVELS:
        w = head_width(cfg, level)
        applied = logits_of(params, stack, [item(level)])[0, :, :w]
        folded = logits_of(merged, None, [item(level)])[0, :, :w]
        assert np.abs(folded - applied).max() < TOL, level
        assert np.abs(folded - r[f"logits_L{level}"]).max() < TOL, level
    # only the targeted kernels change
    flat_b, flat_m = jax.tree_util.tree_flatten_with_path(params)[0], dict(jax.tree_util.tree_flatten_with_path(merged)[0])
    changed = sorted(jax.tree_util.keystr(k) for k, v in flat_b if not np.array_equal(v, flat_m[k]))
    assert len(changed) == 12 and all("kernel" in c and "k_proj" not in c for c in changed)
    with pytest.raises(LoraError, match=r"enabled only at RVQ levels \[1\]"):
        merge_lora(params, lp, lcfg.replace(rvq_levels=(1,)))


def test_merge_cli_then_export_is_a_reference_checkpoint(tmp_path):
    out = tmp_path / "merged"
    assert convert_main(["merge", str(BASE), str(LORA_SFT), str(out), "--heads", str(HEADS)]) == 0
    assert convert_main(["export", str(out), str(tmp_path / "merged.sft")]) == 0
    cfg, params = load_any(tmp_path / "merged.sft", heads=HEADS)
    r = ref()
    for level in LEVELS:
        got = logits_of(params, None, [item(level)])[0, :, : head_width(cfg, level)]
        assert np.abs(got - r[f"logits_L{level}"]).max() < TOL, level
    # same keys, order and metadata as the base file; only the 12 targeted weights differ
    base_t, base_m = read_safetensors(BASE)
    new_t, new_m = read_safetensors(tmp_path / "merged.sft")
    assert list(new_t) == list(base_t) and new_m == base_m
    assert sum(not np.array_equal(base_t[k], new_t[k]) for k in base_t) == 12
    # refusals: output exists; a LoRA restricted to some levels
    assert convert_main(["merge", str(BASE), str(LORA_SFT), str(out), "--heads", str(HEADS)]) == 2
    tensors, meta = _tensors_meta()
    write_safetensors(tmp_path / "l1.sft", tensors, {"config": json.dumps({**MANIFEST["lora_config"], "rvq_levels": [1]})})
    assert convert_main(["merge", str(out), str(tmp_path / "l1.sft"), str(tmp_path / "m2")]) == 2
    assert not (tmp_path / "m2").exists()
    assert convert_main(["merge", str(out), str(tmp_path / "l1.sft"), str(tmp_path / "m3"), "--all-levels"]) == 0


def test_rvq_levels_by_item_level():
    """A LoRA enabled only at level 1: each item of one batch gets the reference's logits of its own level,
    with the LoRA (level 1) or without it (0 and 7); training ignores rvq_levels."""
    cfg, params = base()
    lcfg, lp = fixture_lora()
    r = ref()
    stack = one(lcfg.replace(rvq_levels=(1,)), lp)
    items = [item(0), item(1), item(7)]
    got = logits_of(params, stack, items, [0, 0, 0])
    for i, (level, key) in enumerate([(0, "logits_base_L0"), (1, "logits_L1"), (7, "logits_base_L7")]):
        assert np.abs(got[i, :, : head_width(cfg, level)] - r[key]).max() < TOL, level
    trained = logits_of(params, stack, items, [0, 0, 0], train=True)  # dropout 0: deterministic
    for i, level in enumerate((0, 1, 7)):
        assert np.abs(trained[i, :, : head_width(cfg, level)] - r[f"logits_L{level}"]).max() < TOL, level


def test_dropout_only_in_training():
    cfg, params = base()
    stack = one(*fixture_lora())
    items = [item(0)]  # level 0: the 1025-wide head, no -inf padding columns
    key = {"dropout": jax.random.key(1)}
    ev = logits_of(params, stack, items)
    np.testing.assert_array_equal(logits_of(params, stack, items, rngs=key), ev)  # eval: rng given, no dropout
    tr1 = logits_of(params, stack, items, train=True, dropout=0.1, rngs=key)
    tr1b = logits_of(params, stack, items, train=True, dropout=0.1, rngs=key)
    tr2 = logits_of(params, stack, items, train=True, dropout=0.1, rngs={"dropout": jax.random.key(2)})
    assert np.abs(tr1 - ev).max() > 1e-2 and np.abs(tr1 - tr2).max() > 1e-2
    np.testing.assert_array_equal(tr1, tr1b)  # same key, same masks
    # training without dropout computes what eval computes (another program: float32 reassociation only)
    np.testing.assert_allclose(logits_of(params, stack, items, train=True), ev, rtol=1e-5, atol=1e-5)
    # dropout acts on the LoRA branch only: with B = 0 heavy dropout leaves the base output alone
    fresh = one(LoraConfig(rank=8, alpha=16), init_lora(cfg, LoraConfig(rank=8, alpha=16), jax.random.key(0), params))
    np.testing.assert_allclose(logits_of(params, fresh, items, train=True, dropout=0.5, rngs=key),
                               logits_of(params, None, items), rtol=1e-5, atol=1e-5)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# several LoRAs in one batch


def _second_lora(cfg, params):
    """Another LoRA (rank 4, alpha 8, only on the attention projections) with random nonzero B."""
    lcfg = LoraConfig(name="other", rank=4, alpha=8)
    lp = init_lora(cfg, lcfg, jax.random.key(7), params)
    lp = {"model": {k: {"self_attn": v["self_attn"]} for k, v in lp["model"].items()}}
    keys = iter(jax.random.split(jax.random.key(8), 100))
    lp = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.5 * jax.random.normal(next(keys), x.shape) if jax.tree_util.keystr(p).endswith("'lora_B']") else x, lp)
    return lcfg, lp


@pytest.mark.parametrize("strategy", ["onehot", "gather"])
def test_batch_of_two_loras_and_none_matches_each_alone(strategy):
    cfg, params = base()
    lora_a = fixture_lora()
    lora_b = _second_lora(cfg, params)
    stack = stack_loras([lora_a, lora_b], cfg.resp_levels)
    items = [item(1), item(0, 9, 15, 10), item(7, 12, 20, 18), item(0)]
    index = [0, -1, 1, 0]
    together = logits_of(params, stack, items, index, strategy=strategy)
    seen = []
    for i, (it, k) in enumerate(zip(items, index)):
        w = head_width(cfg, it["level"])  # narrower split heads are padded with -inf columns
        alone = logits_of(params, None if k < 0 else one(*(lora_a, lora_b)[k]), [it])[0, :, :w]
        rows = alone.shape[0]  # valid rows: this item alone has no padding
        assert np.abs(together[i, :rows, :w] - alone).max() < 1e-5, (i, strategy)
        assert not together[i, rows:].any()  # padding rows stay zero
        seen.append(alone)
    assert np.abs(seen[0] - logits_of(params, None, [items[0]])[0, :, :1024]).max() > 1.0  # LoRA A matters
    assert np.abs(seen[2] - logits_of(params, None, [items[2]])[0, :, :1024]).max() > 1e-2  # LoRA B matters


def test_stacking_pads_ranks_and_targets_with_zeros():
    cfg, params = base()
    lora_a, lora_b = fixture_lora(), _second_lora(cfg, params)
    stack = stack_loras([lora_a, lora_b], cfg.resp_levels)
    q = stack.weights["model"]["layers_0"]["self_attn"]["q_proj"]
    up = stack.weights["model"]["layers_0"]["mlp"]["up_proj"]
    assert q["lora_A"].shape == (2, 64, 8) and q["lora_B"].shape == (2, 8, 64)
    assert not np.asarray(q["lora_A"][1, :, 4:]).any() and not np.asarray(q["lora_B"][1, 4:]).any()  # rank 4 -> 8
    assert not np.asarray(up["lora_A"][1]).any() and not np.asarray(up["lora_B"][1]).any()  # no mlp adapter
    np.testing.assert_array_equal(stack.scale, [2.0, 2.0])
    assert stack.levels.shape == (2, cfg.resp_levels) and bool(stack.levels.all())
    axes = lora_logical_axes(stack.weights, logical_axes(cfg))
    qa = axes["model"]["layers_0"]["self_attn"]["q_proj"]
    assert tuple(qa["lora_A"]) == (None, "embed", None) and tuple(qa["lora_B"]) == (None, None, "q_heads")


# ---------------------------------------------------------------------------------------------------------
# the pieces generation and training will use


def test_split_methods_with_lora_match_full_pass():
    """embed -> backbone -> logits as separate applies (as generation calls them) give the full pass's logits."""
    from valle_jax.models.valle import VALLE as M

    cfg, params = base()
    stack = one(*fixture_lora())
    model = M(cfg)
    batch = make_batch([item(1), item(0, 10, 16, 12)])
    level = batch.level
    full = logits_of(params, stack, [item(1), item(0, 10, 16, 12)], [0, 0])

    @jax.jit
    def split(params, stack, batch):
        x, lay = apply_model(model, params, stack, None, batch, level=level, method=M.embed)
        h, _ = apply_model(model, params, stack, None, x, lay.positions, lay.valid, level=level, method=M.backbone)
        logits = apply_model(model, params, stack, None, h, level, level=level, method=M.logits)
        return jnp.where(lay.valid[..., None], logits, 0.0)

    np.testing.assert_allclose(np.asarray(split(params, stack, batch)), full, rtol=0, atol=1e-5)


def test_lora_gradients_under_remat():
    """Gradients reach only the LoRA tree, and rematerialised layers give the same gradients."""
    import dataclasses

    cfg, params = base()
    lcfg, lp = fixture_lora()
    batch = make_batch([item(1), item(0)])

    def loss(lp, params, policy):
        model = VALLE(dataclasses.replace(cfg, remat=policy))  # remat inside the decoder, by policy name
        logits = apply_model(model, params, stack_loras([(lcfg, lp)], cfg.resp_levels), None, batch, train=True)[0]
        return jnp.mean(jnp.square(logits[..., :1024]))

    grad = jax.jit(jax.grad(loss), static_argnums=2)
    g_plain, g_remat = grad(lp, params, "none"), grad(lp, params, "full")
    assert jax.tree.structure(g_plain) == jax.tree.structure(lp)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        assert np.isfinite(a).all() and np.abs(a).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
