"""Greedy AR/NAR loops against the reference's (fixture README section 5); cached = full recompute; batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ALL_VARIANTS, VARIANTS, fixture_paths, heads_of
from valle_jax.convert import load_any
from valle_jax.generate import ar_generate, ar_generate_full, nar_generate
from tools.parity import greedy_outputs
from valle_jax.layout import make_batch


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_greedy_outputs_equal_reference(name):
    ckpt, npz = fixture_paths(name)
    inputs = dict(np.load(npz))
    cfg, params = load_any(ckpt, heads=heads_of(ckpt))
    steps = VARIANTS[name].get("ar_greedy", {}).get("max_steps", 26)
    out = greedy_outputs(cfg, params, inputs, steps)
    for key in ("ar_greedy", "ar_greedy_raw", "nar_greedy"):
        assert (key in out) == (key in inputs), key
        if key in inputs:
            assert out[key].dtype == inputs[key].dtype and out[key].shape == inputs[key].shape, key
            np.testing.assert_array_equal(out[key], inputs[key], err_msg=f"{name} {key}")


@pytest.mark.parametrize("name", ["llama_x4", "llama_v5_split_sums_nonunified", "ar_llama_1"])
def test_cached_loop_equals_full_recompute_and_batch_of_one(name):
    """The KV-cached loop gives the reference's no-cache loop's tokens; a padded mixed batch gives each item its own."""
    ckpt, npz = fixture_paths(name)
    ref = np.load(npz)
    cfg, params = load_any(ckpt, heads=heads_of(ckpt))
    rng = np.random.default_rng(1)
    items = [{"text": ref["text"], "prom": ref["prom"], "resp": ref["resp"][:, :1]}]
    for t, p in [(7, 5), (12, 11), (4, 0)]:  # shorter texts and prompts, one without a prompt
        items.append({"text": np.r_[1, rng.integers(4, 256, t - 2), 2], "prom": rng.integers(0, 1024, (p, cfg.resp_levels)), "resp": np.zeros((1, 1))})
    steps = 20
    run = jax.jit(lambda p, b, cached: (ar_generate if cached else ar_generate_full)(cfg, p, b, steps), static_argnums=2)
    mixed = make_batch(items, pad_to={"text": 16, "prom": 24})
    cached, full = run(params, mixed, True), run(params, mixed, False)
    for field in ("n_raw", "length"):
        np.testing.assert_array_equal(np.asarray(getattr(cached, field)), np.asarray(getattr(full, field)))
    for i in range(len(items)):  # the reference keeps sampling for stopped items; only tokens before that count
        n = int(cached.n_raw[i])
        np.testing.assert_array_equal(np.asarray(cached.tokens[i, :n]), np.asarray(full.tokens[i, :n]))
    for i, it in enumerate(items):  # item 0 alone without padding, the others alone in the same buckets (one compile)
        alone = run(params, make_batch([it]) if i == 0 else make_batch([it], pad_to={"text": 16, "prom": 24}), True)
        n = int(alone.n_raw[0])
        assert int(cached.n_raw[i]) == n and int(cached.length[i]) == int(alone.length[0])
        np.testing.assert_array_equal(np.asarray(cached.tokens[i, :n]), np.asarray(alone.tokens[0, :n]))
    if "ar_greedy_raw" in ref.files:
        np.testing.assert_array_equal(np.asarray(cached.tokens[0, : int(cached.n_raw[0])]), ref["ar_greedy_raw"][:steps])


def test_nar_batch_of_one_equals_padded_batch():
    ckpt, npz = fixture_paths("llama_v5_split_sums_nonunified")
    ref = np.load(npz)
    cfg, params = load_any(ckpt, heads=heads_of(ckpt))
    rng = np.random.default_rng(2)
    lens = [16, 9, 13]
    items = [{"text": ref["text"][: 12 - i], "prom": ref["prom"][: 20 - 4 * i], "resp": rng.integers(0, 1024, (r, 1))} for i, r in enumerate(lens)]
    run = jax.jit(lambda p, b, l0: nar_generate(cfg, p, b, l0))
    batch = make_batch(items, pad_to={"resp": 20})
    codes = np.asarray(run(params, batch, batch.resp[..., 0]))
    for i, it in enumerate(items):
        b1 = make_batch([it])
        one = np.asarray(run(params, b1, b1.resp[..., 0]))[0]
        np.testing.assert_array_equal(codes[i, : lens[i]], one)
    np.testing.assert_array_equal(codes[0], ref["nar_greedy"]) if np.array_equal(items[0]["resp"][:, 0], ref["resp"][:, 0]) else None


def test_max_steps_per_item_and_stop():
    ckpt, npz = fixture_paths("llama_v5_split_sums_nonunified")
    ref = np.load(npz)
    cfg, params = load_any(ckpt, heads=heads_of(ckpt))
    it = {"text": ref["text"], "prom": ref["prom"], "resp": ref["resp"][:, :1]}
    batch = make_batch([it, it, it])
    res = jax.jit(lambda p, b, m: ar_generate(cfg, p, b, 26, max_steps_B=m))(params, batch, jnp.array([26, 3, 5]))
    assert list(np.asarray(res.n_raw)) == [9, 3, 5]  # item 0 stops on its stop token (raw 9 tokens incl. the stop)
    assert list(np.asarray(res.length)) == [8, 3, 5]
    np.testing.assert_array_equal(np.asarray(res.tokens[1, :3]), ref["ar_greedy"][:3])
