"""Unit tests of the Llama backbone (valle_jax/models/llama.py) against independent formulas.

Spec reference-model.md 2.5 (explicit position ids), 2.6 (causal + padding masks), 3.1-3.2 (numerics:
RMSNorm eps 1e-6 with float32 statistics, RoPE rotate-half). Expected values come from numpy float64
formulas written here or from an independent PyTorch implementation (HF `transformers.LlamaModel`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valle_jax.config import Experimental, ModelConfig
from valle_jax.models.llama import (
    LlamaDecoder,
    RMSNorm,
    apply_rope,
    cache_mask,
    causal_mask,
    init_kv_cache,
    rope_cos_sin,
    write_cache,
)

# --------------------------------------------------------------------------------------------------
# independent numpy references
# --------------------------------------------------------------------------------------------------


def np_rope_rotate_half(x_BSHD: np.ndarray, pos_BS: np.ndarray, theta: float) -> np.ndarray:
    """HF convention: inv_freq_i = theta^(-2i/hd), angle duplicated [f, f], x cos + rotate_half(x) sin."""
    x = x_BSHD.astype(np.float64)
    hd = x.shape[-1]
    i = np.arange(hd // 2, dtype=np.float64)
    inv_freq = theta ** (-2.0 * i / hd)
    angle = pos_BS.astype(np.float64)[..., None] * inv_freq  # [B, S, hd/2]
    angle = np.concatenate([angle, angle], axis=-1)[:, :, None, :]  # [B, S, 1, hd]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    rot = np.concatenate([-x2, x1], axis=-1)
    return x * np.cos(angle) + rot * np.sin(angle)


def np_rope_interleaved(x_BSHD: np.ndarray, pos_BS: np.ndarray, theta: float) -> np.ndarray:
    """The other (GPT-J / Meta original, rotate-every-two) convention: pairs (x0,x1), (x2,x3), ..."""
    x = x_BSHD.astype(np.float64)
    hd = x.shape[-1]
    i = np.arange(hd // 2, dtype=np.float64)
    inv_freq = theta ** (-2.0 * i / hd)
    angle = (pos_BS.astype(np.float64)[..., None] * inv_freq)[:, :, None, :]  # [B, S, 1, hd/2]
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = xe * np.cos(angle) - xo * np.sin(angle)
    out[..., 1::2] = xe * np.sin(angle) + xo * np.cos(angle)
    return out


def np_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return w.astype(np.float64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


# --------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hd,theta", [(8, 10000.0), (16, 10000.0), (64, 10000.0), (16, 500000.0)])
def test_rope_cos_sin_formula(hd, theta):
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 60, size=(2, 7))
    cos, sin = rope_cos_sin(jnp.asarray(pos, jnp.int32), hd, theta, jnp.float32)
    assert cos.shape == sin.shape == (2, 7, hd)
    i = np.arange(hd // 2)
    angle = pos[..., None] * theta ** (-2.0 * i / hd)
    angle = np.concatenate([angle, angle], axis=-1)
    np.testing.assert_allclose(np.asarray(cos), np.cos(angle), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), np.sin(angle), atol=2e-5, rtol=0)


@pytest.mark.parametrize("hd,theta", [(8, 10000.0), (16, 10000.0), (64, 10000.0)])
def test_apply_rope_rotate_half(hd, theta):
    rng = np.random.default_rng(1)
    B, S, H = 2, 9, 3
    x = rng.standard_normal((B, S, H, hd)).astype(np.float32)
    pos = rng.integers(0, 60, size=(B, S))
    cos, sin = rope_cos_sin(jnp.asarray(pos, jnp.int32), hd, theta, jnp.float32)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = np_rope_rotate_half(x, pos, theta)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)
    # the test can tell the two conventions apart: the interleaved result is far from ours
    other = np_rope_interleaved(x, pos, theta)
    assert np.max(np.abs(got - other)) > 0.1


def test_rope_is_not_interleaved_unit_vector():
    """x = e_0 at position p: rotate-half moves mass to index hd/2 (sin), interleaved would move it to index 1."""
    hd, p = 8, 3
    x = np.zeros((1, 1, 1, hd), np.float32)
    x[..., 0] = 1.0
    cos, sin = rope_cos_sin(jnp.array([[p]], jnp.int32), hd, 10000.0, jnp.float32)
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin))[0, 0, 0]
    np.testing.assert_allclose(out[0], np.cos(p), atol=1e-6)
    np.testing.assert_allclose(out[hd // 2], np.sin(p), atol=1e-6)
    assert abs(out[1]) < 1e-6  # interleaved would put sin(p) here
    np.testing.assert_allclose(np.delete(out, [0, hd // 2]), 0.0, atol=1e-6)


def test_rope_positions_are_explicit_per_item():
    """Same vectors, different position ids per item -> different results; each matches its own positions."""
    rng = np.random.default_rng(2)
    hd = 16
    x1 = rng.standard_normal((1, 6, 2, hd)).astype(np.float32)
    x = np.concatenate([x1, x1], axis=0)
    pos = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]])  # item 1: per-segment restart
    cos, sin = rope_cos_sin(jnp.asarray(pos, jnp.int32), hd, 10000.0, jnp.float32)
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    np.testing.assert_allclose(out[:, :3], np.broadcast_to(out[:1, :3], out[:, :3].shape), atol=1e-6)
    assert np.max(np.abs(out[0, 3:] - out[1, 3:])) > 0.1
    np.testing.assert_allclose(out, np_rope_rotate_half(x, pos, 10000.0), atol=5e-5)
    # positions are not the row index: item 1 rows 3..5 equal rotating by 0..2
    np.testing.assert_allclose(out[1, 3:], np_rope_rotate_half(x1[:, 3:], np.array([[0, 1, 2]]), 10000.0)[0], atol=5e-5)


def test_rope_relative_dot_product():
    """Independent property: <rope(q, m), rope(k, n)> depends only on m - n."""
    rng = np.random.default_rng(3)
    hd = 16
    q = rng.standard_normal((1, 1, 1, hd)).astype(np.float32)
    k = rng.standard_normal((1, 1, 1, hd)).astype(np.float32)

    def rot(v, p):
        cos, sin = rope_cos_sin(jnp.array([[p]], jnp.int32), hd, 10000.0, jnp.float32)
        return np.asarray(apply_rope(jnp.asarray(v), cos, sin)).ravel().astype(np.float64)

    d1 = rot(q, 7) @ rot(k, 4)
    d2 = rot(q, 13) @ rot(k, 10)
    d3 = rot(q, 7) @ rot(k, 5)
    assert abs(d1 - d2) < 1e-4
    assert abs(d1 - d3) > 1e-3


# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------


def _rmsnorm_apply(x, w, eps, dtype=jnp.float32):
    mod = RMSNorm(eps=eps, dtype=dtype, param_dtype=jnp.float32)
    return np.asarray(mod.apply({"params": {"scale": jnp.asarray(w)}}, jnp.asarray(x)))


def test_rmsnorm_matches_numpy_and_eps_matters():
    rng = np.random.default_rng(4)
    D = 32
    w = (1.0 + 0.3 * rng.standard_normal(D)).astype(np.float32)
    # small magnitude: mean(x^2) ~ 1e-6, so eps 1e-6 vs 1e-5 changes the result by a lot
    x = (1e-3 * rng.standard_normal((3, 5, D))).astype(np.float32)
    got = _rmsnorm_apply(x, w, 1e-6)
    np.testing.assert_allclose(got, np_rmsnorm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    wrong = np_rmsnorm(x, w, 1e-5)
    assert not np.allclose(got, wrong, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(got - wrong)) > 0.1
    # ordinary magnitude
    x2 = rng.standard_normal((3, 5, D)).astype(np.float32) * 4
    np.testing.assert_allclose(_rmsnorm_apply(x2, w, 1e-6), np_rmsnorm(x2, w, 1e-6), rtol=1e-5, atol=1e-5)


def test_rmsnorm_default_eps_is_1e6():
    assert ModelConfig().rms_norm_eps == 1e-6
    assert RMSNorm().eps == 1e-6


def test_rmsnorm_float32_statistics_half_precision():
    """float16 input whose squares overflow float16 (300^2 > 65504): statistics must be float32."""
    rng = np.random.default_rng(5)
    D = 16
    w = (1.0 + 0.3 * rng.standard_normal(D)).astype(np.float32)
    x = (300.0 + 50.0 * rng.standard_normal((2, 3, D))).astype(np.float16)
    got = _rmsnorm_apply(x, w, 1e-6, dtype=jnp.float16)
    assert got.dtype == np.float16
    assert np.all(np.isfinite(got))
    # reference: float32 statistics, cast back to float16, times weight (HF order)
    want = (w.astype(np.float16) * (np_rmsnorm(x, np.ones(D), 1e-6)).astype(np.float16)).astype(np.float64)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=3e-3, atol=3e-3)
    assert np.max(np.abs(got)) > 0.5  # a float16 overflow would give 0 (x / inf)


# --------------------------------------------------------------------------------------------------
# masks and cache writes
# --------------------------------------------------------------------------------------------------


def test_causal_mask_with_padding():
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
    got = np.asarray(causal_mask(jnp.asarray(valid)))
    B, S = valid.shape
    want = np.zeros((B, S, S), bool)
    for b in range(B):
        for i in range(S):
            for j in range(S):
                want[b, i, j] = (j <= i) and valid[b, j]
    assert got.shape == (B, S, S)
    np.testing.assert_array_equal(got, want)
    # explicit rows from the definition
    np.testing.assert_array_equal(got[1, 4], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(got[0, 2], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(got[2, 3], [1, 0, 0, 0, 0])


def test_cache_mask():
    index = np.array([0, 3, 6])
    n_new, L = 4, 10
    got = np.asarray(cache_mask(jnp.asarray(index, jnp.int32), n_new, L))
    want = np.zeros((3, n_new, L), bool)
    for b in range(3):
        for i in range(n_new):
            want[b, i, : index[b] + i + 1] = True
    assert got.shape == (3, n_new, L)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[1, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])


def test_write_cache_per_item_offsets():
    rng = np.random.default_rng(6)
    B, L, K, D, S = 3, 12, 2, 4, 3
    cache = rng.standard_normal((B, L, K, D)).astype(np.float32)
    new = rng.standard_normal((B, S, K, D)).astype(np.float32)
    index = np.array([0, 4, 9])
    got = np.asarray(write_cache(jnp.asarray(cache), jnp.asarray(new), jnp.asarray(index, jnp.int32)))
    want = cache.copy()
    for b in range(B):
        want[b, index[b] : index[b] + S] = new[b]
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------------
# decoder helpers
# --------------------------------------------------------------------------------------------------


def small_cfg(kv_heads: int = 0) -> ModelConfig:
    return ModelConfig(
        dim=32, heads=4, layers=2, ffn=128, dropout=0.0, resp_levels=2,
        experimental=Experimental(kv_heads=kv_heads),
    )  # fmt: skip


def randomize(params, seed: int):
    """Replace the tiny default init by O(1)-effect weights so wrong attention would show up."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if "scale" in name:
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        elif "kernel" in name:
            v = rng.standard_normal(shape) / np.sqrt(shape[0])
            if "q_proj" in name or "k_proj" in name:
                v = v * 2.0
        else:
            v = rng.standard_normal(shape) * 0.1
        out.append(jnp.asarray(v, jnp.float32))
    return jax.tree_util.tree_unflatten(tree, out)


def init_decoder(cfg: ModelConfig, seed: int = 0):
    dec = LlamaDecoder(cfg)
    x = jnp.zeros((1, 4, cfg.d_model), jnp.float32)
    params = nn.unbox(dec.init(jax.random.key(seed), x, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))["params"])
    return dec, randomize(params, seed + 100)


# --------------------------------------------------------------------------------------------------
# KV cache: prefill + decode == full recompute
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [0, 2])
@pytest.mark.parametrize("step", [1, 4])
def test_kv_cache_matches_full_recompute(kv_heads, step):
    cfg = small_cfg(kv_heads)
    assert cfg.n_kv_heads == (kv_heads or cfg.n_heads)
    dec, params = init_decoder(cfg, seed=kv_heads)
    D = cfg.d_model
    rng = np.random.default_rng(7 + step)
    lens = np.array([5, 8, 3])
    B, S0, n_dec = len(lens), int(lens.max()), 8
    S_full = S0 + n_dec
    # every item: its prefix rows then n_dec decoded rows; explicit, non-monotonic position ids
    seq = [rng.standard_normal((lens[b] + n_dec, D)).astype(np.float32) for b in range(B)]
    pos = [rng.integers(0, 40, size=lens[b] + n_dec) for b in range(B)]

    # full recompute without cache (right-padded; padding rows zeros, position 1)
    x_full = np.zeros((B, S_full, D), np.float32)
    p_full = np.ones((B, S_full), np.int32)
    v_full = np.zeros((B, S_full), bool)
    for b in range(B):
        n = lens[b] + n_dec
        x_full[b, :n], p_full[b, :n], v_full[b, :n] = seq[b], pos[b], True
    apply = jax.jit(lambda x, p, v, c: dec.apply({"params": params}, x, p, v, cache=c))
    h_full, none_cache = dec.apply({"params": params}, jnp.asarray(x_full), jnp.asarray(p_full), jnp.asarray(v_full))
    assert none_cache is None
    h_full = np.asarray(h_full)

    # prefill: right-padded prefixes; padding rows hold garbage that must never be seen later
    x_pre = rng.standard_normal((B, S0, D)).astype(np.float32) * 3
    p_pre = np.ones((B, S0), np.int32)
    v_pre = np.zeros((B, S0), bool)
    for b in range(B):
        x_pre[b, : lens[b]], p_pre[b, : lens[b]], v_pre[b, : lens[b]] = seq[b][: lens[b]], pos[b][: lens[b]], True
    cache = init_kv_cache(cfg, B, S_full + 4)
    assert cache["layers"][0]["k"].shape == (B, S_full + 4, cfg.n_kv_heads, cfg.head_dim)
    h_pre, cache = apply(jnp.asarray(x_pre), jnp.asarray(p_pre), jnp.asarray(v_pre), cache)
    np.testing.assert_array_equal(np.asarray(cache["index"]), lens)
    h_pre = np.asarray(h_pre)
    for b in range(B):
        np.testing.assert_allclose(h_pre[b, : lens[b]], h_full[b, : lens[b]], atol=1e-5, rtol=0)

    # decode `step` rows at a time (each item at its own offset)
    for j0 in range(0, n_dec, step):
        x_new = np.stack([seq[b][lens[b] + j0 : lens[b] + j0 + step] for b in range(B)])
        p_new = np.stack([pos[b][lens[b] + j0 : lens[b] + j0 + step] for b in range(B)]).astype(np.int32)
        v_new = np.ones((B, step), bool)
        h_new, cache = apply(jnp.asarray(x_new), jnp.asarray(p_new), jnp.asarray(v_new), cache)
        np.testing.assert_array_equal(np.asarray(cache["index"]), lens + j0 + step)
        h_new = np.asarray(h_new)
        for b in range(B):
            rows = slice(lens[b] + j0, lens[b] + j0 + step)
            np.testing.assert_allclose(h_new[b], h_full[b, rows], atol=1e-5, rtol=0)


def test_kv_cache_decode_differs_if_history_ignored():
    """Sanity of the cache test: a decode step with an empty cache does not match the recompute."""
    cfg = small_cfg()
    dec, params = init_decoder(cfg)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 6, cfg.d_model)).astype(np.float32)
    p = np.arange(6)[None].astype(np.int32)
    h_full = np.asarray(dec.apply({"params": params}, jnp.asarray(x), jnp.asarray(p), jnp.ones((1, 6), bool))[0])
    cache = init_kv_cache(cfg, 1, 8)
    cache = {**cache, "index": jnp.array([5], jnp.int32)}  # claims 5 rows, but they are zeros
    h, _ = dec.apply({"params": params}, jnp.asarray(x[:, 5:]), jnp.asarray(p[:, 5:]), jnp.ones((1, 1), bool), cache=cache)
    assert np.max(np.abs(np.asarray(h)[0, 0] - h_full[0, 5])) > 1e-3


# --------------------------------------------------------------------------------------------------
# against PyTorch / HF transformers LlamaModel
# --------------------------------------------------------------------------------------------------


def hf_llama(num_kv_heads: int, seed: int):
    import torch  # required: the independent implementation this test compares against (no skip)
    import transformers
    from transformers import LlamaModel  # noqa: F401
    kw = dict(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, hidden_act="gelu", rms_norm_eps=1e-6, attention_bias=False,
        mlp_bias=False, vocab_size=1025, max_position_embeddings=2048, attention_dropout=0.0,
    )  # fmt: skip
    try:
        config = transformers.LlamaConfig(rope_theta=10000.0, attn_implementation="eager", **kw)
    except TypeError:
        config = transformers.LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **kw)
        config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaModel(config).eval().float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2 and "embed_tokens" not in name:
                scale = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return torch, model


def hf_to_params(model, n_layers: int) -> dict:
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    params: dict = {"embed_tokens": jnp.asarray(sd["embed_tokens.weight"]), "norm": {"scale": jnp.asarray(sd["norm.weight"])}}
    for i in range(n_layers):
        pre = f"layers.{i}."
        params[f"layers_{i}"] = {
            "self_attn": {n: {"kernel": jnp.asarray(sd[pre + f"self_attn.{n}.weight"].T)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {n: {"kernel": jnp.asarray(sd[pre + f"mlp.{n}.weight"].T)} for n in ("gate_proj", "up_proj", "down_proj")},
            "input_layernorm": {"scale": jnp.asarray(sd[pre + "input_layernorm.weight"])},
            "post_attention_layernorm": {"scale": jnp.asarray(sd[pre + "post_attention_layernorm.weight"])},
        }  # fmt: skip
    return params


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_decoder_matches_hf_llama(kv_heads):
    torch, model = hf_llama(kv_heads, seed=kv_heads)
    cfg = small_cfg(0 if kv_heads == 4 else kv_heads)
    assert cfg.n_kv_heads == kv_heads
    dec = LlamaDecoder(cfg)
    params = hf_to_params(model, cfg.n_layers)
    # the copied tree must have exactly our parameter structure
    ref_tree = nn.unbox(dec.init(jax.random.key(0), jnp.zeros((1, 2, 32)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool))["params"])
    assert jax.tree_util.tree_structure(ref_tree) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, ref_tree, params))

    rng = np.random.default_rng(9)
    B, S = 2, 10
    x = rng.standard_normal((B, S, 32)).astype(np.float32)
    # item 0: per-segment position ids (spec 2.5 style); item 1: right-padded to 7 valid rows
    pos = np.array([[0, 1, 2, 3, 4, 5, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2, 1, 1, 1]], np.int64)
    valid = np.array([[1] * 10, [1] * 7 + [0] * 3], bool)

    with torch.no_grad():
        out = model(
            inputs_embeds=torch.from_numpy(x),
            position_ids=torch.from_numpy(pos),
            attention_mask=torch.from_numpy(valid.astype(np.int64)),
        )
    want = out.last_hidden_state.numpy()
    got, _ = dec.apply({"params": params}, jnp.asarray(x), jnp.asarray(pos, jnp.int32), jnp.asarray(valid))
    got = np.asarray(got)
    for b in range(B):
        n = int(valid[b].sum())
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=2e-5, rtol=0)
    # sensitivity: the same run with unified positions is clearly different
    got_unified, _ = dec.apply({"params": params}, jnp.asarray(x), jnp.broadcast_to(jnp.arange(S), (B, S)), jnp.asarray(valid))
    assert np.max(np.abs(np.asarray(got_unified)[0, 6:] - want[0, 6:])) > 1e-2
