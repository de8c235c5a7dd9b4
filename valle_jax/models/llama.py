"""The Llama backbone as HF `LlamaModel` computes it for the reference (spec reference-model.md 3.1-3.3).

Shapes: B batch, S rows of this call, L cache rows, D model dim, H query heads, K kv heads, G = H // K,
Dh head dim, F ffn dim. Parameter names mirror the reference state dict (convert.py maps them 1:1).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from valle_jax.config import ModelConfig
from valle_jax.models import backbone
from valle_jax.parallel import constrain

Array = jax.Array
KVCache = dict[str, Any]  # {"index": [B] int32 rows already cached, "layers": ({"k": [B,L,K,Dh], "v": ...}, ...)}

NEG_INF = -1e30  # finite: a fully masked (padding) row must not produce NaN
# The residual stream's logical axes: rows split over the batch axes; the model dim whole ("embed" maps to fsdp
# for weights, but the batch already uses fsdp, and `parallel.spec_for` never uses a mesh axis twice).
RESIDUAL = ("batch", "length", "embed")


def dense(features: int, axes: tuple[str, str], cfg: ModelConfig, name: str, use_bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        dot_general=backbone.dense_dot_general(cfg),
        name=name,
    )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) with float32 statistics, cast back, then times the weight (HF order)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> Array:
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_cos_sin(positions_BS: Array, head_dim: int, theta: float, dtype: Any) -> tuple[Array, Array]:
    """cos/sin [B, S, Dh]: angle = position * inv_freq, duplicated to [f, f] (rotate-half convention)."""
    angle = positions_BS.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    angle = jnp.concatenate([angle, angle], axis=-1)
    return jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype)


def apply_rope(x_BSHD: Array, cos_BSD: Array, sin_BSD: Array) -> Array:
    half = x_BSHD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BSHD[..., half:], x_BSHD[..., :half]], axis=-1)
    return x_BSHD * cos_BSD[:, :, None, :] + rotated * sin_BSD[:, :, None, :]


def dropout_keep(key: Array, shape: tuple[int, ...], rate: float) -> tuple[Array, float]:
    """(keep mask of `shape`, 1 / keep probability) for dropout of `rate`. Each 32-bit threefry draw gives two
    16-bit uniforms (pairs along the last axis), half the draws of `jax.random.bernoulli` (threefry was the
    costliest part of attention dropout on CPU); the rate is quantized to 1/65536 (0.1 -> 0.1000061) and the
    scale uses the quantized keep probability, so the expectation is exact. Counter-based like every threefry
    draw: the mask does not depend on how the array is sharded. A rate that rounds to 1 drops everything (scale 0),
    as flax's Dropout does at rate 1."""
    drop = round(rate * 65536)
    if drop >= 65536:
        return jnp.zeros(shape, bool), 0.0
    *lead, n = shape
    bits = jax.random.bits(key, (*lead, (n + 1) // 2), jnp.uint32)
    halves = jnp.stack([bits & 0xFFFF, bits >> 16], axis=-1).reshape(*lead, -1)[..., :n]
    return halves >= drop, 65536.0 / (65536 - drop)


def attend_xla(q_BSHD: Array, k_BLKD: Array, v_BLKD: Array, mask_BSL: Array, dropout: Callable[[Array], Array] | None,
               heads_first: bool = False) -> Array:  # fmt: skip
    """softmax(q k^T / sqrt(Dh) + mask) v with float32 scores/softmax; GQA by grouping query heads.
    `heads_first` (ModelConfig.cpu_layouts): move the head axes ahead of the rows once, so both products are
    batched matmuls whose batch axes lead; XLA's CPU backend otherwise transposes the [S, L] scores and
    probabilities around them (the attention's training step 2.5x slower there). The same numbers either way."""
    B, S, H, Dh = q_BSHD.shape
    K = k_BLKD.shape[2]
    q = q_BSHD.reshape(B, S, K, H // K, Dh)
    k, v = k_BLKD, v_BLKD
    rows = "bskgd,blkd->bkgsl", "bkgsl,blkd->bskgd"
    if heads_first:
        q, k, v = q.transpose(0, 2, 3, 1, 4), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        rows = "bkgsd,bkld->bkgsl", "bkgsl,bkld->bkgsd"
    scores = jnp.einsum(rows[0], q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(Dh)))
    scores = jnp.where(mask_BSL[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    out = jnp.einsum(rows[1], probs.astype(v.dtype), v)
    if heads_first:
        out = out.transpose(0, 3, 1, 2, 4)  # [B, S, K, G, Dh]
    return out.reshape(B, S, H, Dh)


def attend_cudnn(q_BSHD: Array, k_BSKD: Array, v_BSKD: Array, lengths_B: Array) -> Array:
    """cuDNN flash attention (GPU, fp16/bf16): causal with right padding given as per-item lengths."""
    return jax.nn.dot_product_attention(
        q_BSHD, k_BSKD, v_BSKD, is_causal=True, query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
        implementation="cudnn",
    )  # fmt: skip


SPLASH_BLOCK = 128  # the splash kernel's smallest tile (its lane width): sequences are padded to a multiple of it
SPLASH_TILES = (512, 384, 256, 128)  # tiles tried, largest first


def splash_tile(n_rows: int) -> int:
    """The splash kernel's tile for `n_rows` (a multiple of SPLASH_BLOCK): the largest of SPLASH_TILES dividing it.
    The kernel's default 128-row tiles re-read every key/value tile once per 128 query rows (and query tiles per
    128 key rows in the backward pass); a 384-512-row tile cuts those HBM re-reads 3-4x."""
    return next(t for t in SPLASH_TILES if n_rows % t == 0)


def _splash_local(q_BHSD: Array, k_BHSD: Array, v_BHSD: Array, seg_BS: Array, interpret: bool) -> Array:
    """Splash attention over the (local) batch: one causal mask per (local) head, padding as segment 0."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    _, H, S, _ = q_BHSD.shape
    mask = masks.MultiHeadMask([masks.CausalMask((S, S)) for _ in range(H)])
    t = splash_tile(S)
    # one fused backward kernel (dq, dk, dv together) reads each query / key tile pair once, not twice; q, k, v
    # laid out rows-minor ([H, Dh, S]): with the 64-wide head dim minor, every tile was padded to 128 lanes (the
    # v5e AOT step: 106 -> 96 GB of HBM traffic, and less padding besides)
    seq_minor = splash.QKVLayout.SEQ_MINOR
    tiles = splash.BlockSizes(block_q=t, block_kv=t, block_kv_compute=t, block_q_dkv=t, block_kv_dkv=t,
                              block_kv_dkv_compute=t, use_fused_bwd_kernel=True,
                              q_layout=seq_minor, k_layout=seq_minor, v_layout=seq_minor)  # fmt: skip
    kernel = splash.make_splash_mha(mask, block_sizes=tiles, head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q_BHSD, k_BHSD, v_BHSD, seg_BS)


def attend_splash(q_BSHD: Array, k_BSKD: Array, v_BSKD: Array, valid_BS: Array, interpret: bool = False) -> Array:
    """Pallas splash attention (TPU): causal, right padding as segment ids (valid rows 1, padding 0, so a padding
    row only sees padding and stays finite). GQA by repeating kv heads. Under a mesh the kernel runs per shard
    (`shard_map` over the batch and head axes of the rules table). `interpret`: Pallas interpret mode (CPU)."""
    B, S, H, Dh = q_BSHD.shape
    K = k_BSKD.shape[2]
    pad = -S % SPLASH_BLOCK  # rows up to the kernel's tile: padding rows (segment 0) only see padding
    rows = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    q = jnp.swapaxes(rows(q_BSHD * jnp.asarray(Dh**-0.5, q_BSHD.dtype)), 1, 2)  # [B, H, S', Dh]
    k = jnp.swapaxes(rows(jnp.repeat(k_BSKD, H // K, axis=2)), 1, 2)
    v = jnp.swapaxes(rows(jnp.repeat(v_BSKD, H // K, axis=2)), 1, 2)
    seg = rows(valid_BS.astype(jnp.int32))
    local = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if not mesh.empty and mesh.size > 1 and rules:
        from valle_jax.parallel import spec_for

        spec = spec_for(("batch", "heads", "length", "kv"), q.shape, mesh, rules)
        spec = P(*(tuple(spec) + (None,) * (4 - len(spec))))
        seg_spec = P(spec[0], None)
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False)
    return jnp.swapaxes(local(q, k, v, seg), 1, 2)[:, :S].astype(q_BSHD.dtype)


def attention_path(cfg: ModelConfig, n_rows: int, cached: bool) -> str:
    """The attention computation a call really runs (a pure function of static facts, so logs and benchmarks name
    the path that ran): "cudnn" / "splash" for a teacher-forced pass on those kernels (splash pads the rows to its
    128-row tile), else "xla" (KV-cached passes, `auto` never resolved)."""
    impl = str(cfg.attention_impl)
    if cached or impl in ("xla", "auto"):
        return "xla"
    return impl


def causal_mask(valid_BS: Array) -> Array:
    """[B, S, S]: query i may see key j iff j <= i and j is a valid (non-padding) row (spec 2.6)."""
    S = valid_BS.shape[1]
    causal = jnp.tril(jnp.ones((S, S), dtype=bool))
    return causal[None] & valid_BS[:, None, :]


def cache_mask(index_B: Array, n_new: int, cache_len: int) -> Array:
    """[B, S, L]: new row i of item b sits at cache row index_b + i and sees cache rows 0..index_b + i."""
    row = index_B[:, None] + jnp.arange(n_new)[None, :]
    return jnp.arange(cache_len)[None, None, :] <= row[:, :, None]


def write_cache(cache_BLKD: Array, new_BSKD: Array, index_B: Array) -> Array:
    """Write each item's S new rows at its own offset (items in a batch may be at different lengths)."""
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (i, 0, 0)))(cache_BLKD, new_BSKD, index_B)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BSD, cos_sin, mask_BSL, valid_BS, layer_cache=None, index_B=None, deterministic=True):
        cfg = self.cfg
        H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        B, S, _ = x_BSD.shape
        heads = ("batch", "length", "heads", "kv")
        q = constrain(dense(H * Dh, ("embed", "q_heads"), cfg, "q_proj")(x_BSD).reshape(B, S, H, Dh), heads)
        k = constrain(dense(K * Dh, ("embed", "kv_heads"), cfg, "k_proj")(x_BSD).reshape(B, S, K, Dh), heads)
        v = constrain(dense(K * Dh, ("embed", "kv_heads"), cfg, "v_proj")(x_BSD).reshape(B, S, K, Dh), heads)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)

        new_cache = None
        if layer_cache is not None:
            k_all = write_cache(layer_cache["k"], k.astype(layer_cache["k"].dtype), index_B)
            v_all = write_cache(layer_cache["v"], v.astype(layer_cache["v"].dtype), index_B)
            new_cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)

        path = attention_path(cfg, S, layer_cache is not None)
        rate = cfg.attention_dropout_rate
        if path == "cudnn":
            out = attend_cudnn(q, k, v, valid_BS.sum(-1).astype(jnp.int32))
        elif path == "splash":
            out = attend_splash(q, k, v, valid_BS, interpret=cfg.kernel_interpret)
        else:
            drop = None
            if not deterministic and rate > 0:
                key = self.make_rng("dropout")

                def drop(probs: Array) -> Array:
                    keep, scale = dropout_keep(key, probs.shape, rate)
                    return jnp.where(keep, probs * scale, 0.0)
            out = attend_xla(q, k, v, mask_BSL, drop, heads_first=cfg.cpu_layouts)
        out = constrain(out, heads).reshape(B, S, H * Dh)
        out = dense(cfg.d_model, ("q_heads", "embed"), cfg, "o_proj")(out)
        return constrain(out, RESIDUAL), new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BSD: Array) -> Array:
        cfg = self.cfg
        gate = dense(cfg.ffn_dim, ("embed", "mlp"), cfg, "gate_proj")(x_BSD)
        up = dense(cfg.ffn_dim, ("embed", "mlp"), cfg, "up_proj")(x_BSD)
        # hidden_act "gelu" in HF is the exact erf GELU (spec 3.1)
        hidden = constrain(nn.gelu(gate, approximate=False) * up, ("batch", "length", "mlp"))
        return constrain(dense(cfg.d_model, ("mlp", "embed"), cfg, "down_proj")(hidden), RESIDUAL)


class LlamaLayer(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True  # an attribute, not a call argument: remat needs array-only arguments

    @nn.compact
    def __call__(self, h, cos_sin, mask, valid, layer_cache=None, index=None):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
        a, new_cache = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(h), cos_sin, mask, valid, layer_cache, index, self.deterministic
        )
        h = constrain(h + a, RESIDUAL)
        h = constrain(h + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(h)), RESIDUAL)
        return h, new_cache


class LlamaDecoder(nn.Module):
    """Decoder stack + final norm. With `cache`, the S new rows are appended to each item's cached rows
    (`step` changes nothing here: prefill and decode steps are the same computation)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BSD: Array,
        positions_BS: Array,
        valid_BS: Array,
        cache: KVCache | None = None,
        deterministic: bool = True,
        step: bool = False,
    ) -> tuple[Array, KVCache | None]:
        cfg = self.cfg
        if cfg.embed_tokens:  # HF LlamaModel.embed_tokens: in every checkpoint, never read (spec 3.4)
            self.param(
                "embed_tokens",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                (cfg.n_resp_tokens, cfg.d_model),
                cfg.param_dtype,
            )
        h = x_BSD.astype(cfg.dtype)
        cos_sin = rope_cos_sin(positions_BS, cfg.head_dim, cfg.rope_theta, cfg.dtype)
        if cache is None:
            mask, index = causal_mask(valid_BS), None
        else:
            index = cache["index"]
            mask = cache_mask(index, x_BSD.shape[1], cache["layers"][0]["k"].shape[1])
        layer_cls = backbone.remat_layer(LlamaLayer, cfg)
        new_layers = []
        for i in range(cfg.n_layers):
            layer_cache = None if cache is None else cache["layers"][i]
            h, lc = layer_cls(cfg, deterministic, name=f"layers_{i}")(h, cos_sin, mask, valid_BS, layer_cache, index)
            new_layers.append(lc)
        h = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(h)
        new_cache = None
        if cache is not None:
            new_cache = {"index": index + valid_BS.sum(-1).astype(jnp.int32), "layers": tuple(new_layers)}
        return h, new_cache


def init_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """Preallocated cache. `max_len` must cover every row ever written (prefix bucket + decode steps)."""
    dtype = dtype or cfg.dtype
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    layer = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}  # noqa: E731
    return {"index": jnp.zeros((batch,), jnp.int32), "layers": tuple(layer() for _ in range(cfg.n_layers))}


def kv_cache_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every `init_kv_cache` leaf."""
    layer = {"k": ("batch", "length", "kv_heads", "kv"), "v": ("batch", "length", "kv_heads", "kv")}
    return {"index": ("batch",), "layers": tuple(dict(layer) for _ in range(cfg.n_layers))}


def _config_from_keys(tensors: Mapping[str, Any], fields: dict, has_metadata: bool) -> dict:
    """Config fields the reference keys of a Llama checkpoint give (spec 7.6, 1.7)."""
    out: dict[str, Any] = {}
    gate = tensors.get("model.layers.0.mlp.gate_proj.weight")
    out["ffn"] = int(gate.shape[0]) if gate is not None else None
    kproj = tensors.get("model.layers.0.self_attn.k_proj.weight")
    if kproj is not None and kproj.shape[0] != fields["dim"]:
        out["experimental.kv_heads"] = int(kproj.shape[0]) // (fields["dim"] // fields["heads"])
    if not has_metadata:  # the split-head llama releases use per-segment positions (spec 1.7)
        out["experimental.unified_position_ids"] = not fields["split_classifiers"]
    return out


backbone.register(backbone.Backbone(
    name="llama",
    decoder=LlamaDecoder,
    init_state=init_kv_cache,
    state_axes=kv_cache_axes,
    matches_keys=lambda keys: any(".self_attn." in k for k in keys),
    config_from_keys=_config_from_keys,
    lora_targets=(("self_attn", "mlp"), ("self_attn.k_proj",)),
    attention_path=attention_path,
))  # fmt: skip
