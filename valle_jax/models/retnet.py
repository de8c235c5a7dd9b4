"""RetNet backbone: torchscale's `RetNetDecoder` as vall-e used it (spec: shared/spec/reference-retnet.md).

Three forms of multi-scale retention, all exact to the reference's formulas:
* "parallel"  (3.5): decay mask with per-row sqrt normalisation, then rows divided by max(1, |sum A|);
* "chunkwise" (3.8): chunks of C rows, inner rows divided by max(1, sum |A|), a cross-chunk state with its
  own scale; C >= T is the reference's inference path (one 512-row chunk);
* "recurrent" (3.7): one row at a time, sqrt-scaled state, no row normaliser.
They differ only by a positive per-(item, head, row) factor in front of the retention output, which the
group norm removes up to its epsilon (3.6, 3.12).

Incremental decoding carries a `RetNetState` (see `init_state`): per layer the decayed key/value sum, the
decayed key sum and the decay-weighted row count, plus a per-item offset, so the items of a batch can sit at
different positions (right-padded prompts of different lengths). Any mode can continue from any state:
* "parallel" with a state is the parallel form restricted to the new rows -- a prefill followed by 1-row
  steps reproduces the whole-sequence parallel output to round-off (this is the AR decode path to use);
* "recurrent" with a state is torchscale's recurrent form;
* "chunkwise" with a state treats the carried prefix as the previous chunks (chunks start at the block).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from valle_jax.config import GroupNorm, ModelConfig, RetNetMode
from valle_jax.models import backbone

# {"offset": int32 [B], "layers_{i}": {"kv": [B,H,dk,dv], "ksum": [B,H,dk], "scale": [B,H]}}
RetNetState = dict[str, Any]
MODES = tuple(m.value for m in RetNetMode)
GROUP_NORMS = tuple(g.value for g in GroupNorm)
F32 = jnp.float32


# ----------------------------------------------------------------------------------------------- sizes, state


def _sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    """(heads, key dim per head, value dim per head): value width is 2 * d_model (spec 1a)."""
    h = cfg.n_heads
    dk = cfg.d_model // h
    return h, dk, 2 * dk


def init_state(cfg: ModelConfig, batch: int, max_len: int = 0, dtype: Any = jnp.float32) -> RetNetState:
    """An empty decoding state (no tokens consumed), batch-first, static shapes (a `lax.while_loop` carry).

    Per layer, with n the item's last consumed position and gamma the head's decay:
      kv    [B, H, dk, dv]: sum_m gamma^(n-m) kr_m (x) v_m / sqrt(scale)   (torchscale's recurrent state,
                            stored key-major as its chunkwise state)
      ksum  [B, H, dk]    : sum_m gamma^(n-m) kr_m / sqrt(scale)           (only the parallel normaliser needs it)
      scale [B, H]        : sum_{j<=n} gamma^j                              (0 before the first token)
    offset [B] int32: tokens consumed per item = rotation position of its next token.
    Keep it float32: the decayed sums are the long-range memory of every head. The size does not depend on the
    sequence length (`max_len` is accepted for the backbone interface).
    """
    h, dk, dv = _sizes(cfg)
    state: RetNetState = {"offset": jnp.zeros((batch,), jnp.int32)}
    for i in range(cfg.n_layers):
        state[f"layers_{i}"] = {
            "kv": jnp.zeros((batch, h, dk, dv), dtype),
            "ksum": jnp.zeros((batch, h, dk), dtype),
            "scale": jnp.zeros((batch, h), dtype),
        }
    return state


def state_logical_axes(cfg: ModelConfig) -> RetNetState:
    """Logical axis names of each `init_state` leaf (same pytree), for sharding the decode carry."""
    axes: RetNetState = {"offset": ("batch",)}
    for i in range(cfg.n_layers):
        axes[f"layers_{i}"] = {"kv": ("batch", "heads", None, None), "ksum": ("batch", "heads", None),
                               "scale": ("batch", "heads")}
    return axes


# ------------------------------------------------------------------------------------ relative position buffers


def _torch_linspace01(n: int) -> np.ndarray:
    """torch.linspace(0, 1, n) in float32: symmetric kernel, first half from 0, second half from 1 (spec 3.3)."""
    if n == 1:
        return np.zeros((1,), np.float32)
    step = np.float32(1.0) / np.float32(n - 1)
    i = np.arange(n)
    lo = step * i.astype(np.float32)
    hi = np.float32(1.0) - step * (n - 1 - i).astype(np.float32)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def rel_pos_angle(key_dim: int, base: float = 10000.0) -> np.ndarray:
    """Initial `retnet_rel_pos.angle` [key_dim]: theta_i = base^-linspace(0,1,dk/2)_i, each repeated twice.

    Only for new models: a checkpoint's (bf16-rounded) buffer must be loaded instead (spec 3.3, U3).
    """
    t = _torch_linspace01(key_dim // 2)
    theta = np.float32(1.0) / np.power(np.float32(base), t, dtype=np.float32)
    return np.repeat(theta, 2).astype(np.float32)


def rel_pos_decay(heads: int) -> np.ndarray:
    """Initial `retnet_rel_pos.decay` [heads]: lambda_h = ln(1 - 2^-(5+h)) (spec 3.3)."""
    p = np.power(np.float32(2.0), -(5.0 + np.arange(heads, dtype=np.float32)), dtype=np.float32)
    return np.log(np.float32(1.0) - p, dtype=np.float32)


class RetNetRelPos(nn.Module):
    """Holds the two reference buffers as params; returns them float32 and gradient-free."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        h, dk, _ = _sizes(self.cfg)
        pdt = jnp.dtype(self.cfg.param_dtype)
        angle = self.param("angle", nn.with_logical_partitioning(
            lambda _key: jnp.asarray(rel_pos_angle(dk, self.cfg.rope_theta), pdt), ("norm",)))
        decay = self.param("decay", nn.with_logical_partitioning(
            lambda _key: jnp.asarray(rel_pos_decay(h), pdt), ("norm",)))
        # Buffers in the reference: never trained (mask them out of weight decay too).
        return jax.lax.stop_gradient(angle.astype(F32)), jax.lax.stop_gradient(decay.astype(F32))


# ------------------------------------------------------------------------------------------------ small layers


class Norm(nn.Module):
    """torch LayerNorm (two-pass variance, weight + bias) or torchscale RMSNorm (weight only), float32 math."""

    eps: float
    rms: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
                           self.param_dtype)
        y = _rms(x, self.eps) if self.rms else _layernorm(x, self.eps)
        y = y * scale.astype(F32)
        if not self.rms:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
                              self.param_dtype)
            y = y + bias.astype(F32)
        return y.astype(self.dtype)


def _layernorm(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(F32)
    xc = x - jnp.mean(x, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)


def _rms(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _xavier(gain: float) -> Callable:
    return nn.initializers.variance_scaling(gain * gain, "fan_avg", "uniform")


# torch's default Linear init (kaiming-uniform, a=sqrt(5)) = uniform(+-1/sqrt(fan_in))
_TORCH_LINEAR = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str, init: Callable) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=cfg.retnet_use_biases,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        dot_general=backbone.dense_dot_general(cfg),
        name=name,
    )


def _dropout_rate(cfg: ModelConfig) -> float:
    return cfg.dropout if cfg.training else 0.0  # the reference builds dropout 0 when not training (spec 1a)


# -------------------------------------------------------------------------------------------- retention forms


def _rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """theta_shift: interleaved pairs (GPT-J style), out[2i] = x2i c - x2i+1 s, out[2i+1] = x2i+1 c + x2i s."""
    xf = x.astype(F32)
    swapped = jnp.stack([-xf[..., 1::2], xf[..., 0::2]], axis=-1).reshape(xf.shape)
    return (xf * cos + swapped * sin).astype(x.dtype)


def _decay_mask(lam: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """Unnormalised causal decay mask exp((i-j) lambda) [H, T, T] (exp of the float product, not pow) and its
    row sums [H, T]."""
    idx = jnp.arange(rows, dtype=F32)
    dist = idx[:, None] - idx[None, :]
    causal = dist >= 0
    mask = jnp.where(causal[None], jnp.exp(jnp.where(causal, dist, 0.0)[None] * lam[:, None, None]), 0.0)
    return mask, mask.sum(-1)


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


def parallel_retention(q: jax.Array, k: jax.Array, v: jax.Array, lam: jax.Array,
                       state: dict | None = None) -> jax.Array:
    """Parallel form (spec 3.5). q, k [B,H,T,dk] rotated (k scaled), v [B,H,T,dv]; returns [B,H,T,dv] float32.

    With a layer state the block's rows continue the carried prefix: each row's decay-mask normaliser r and
    its row sum include the prefix, so the result equals the whole-sequence parallel form row for row.
    """
    t = q.shape[2]
    mask_raw, rowsum = _decay_mask(lam, t)
    qk = _einsum("bhik,bhjk->bhij", q, k)
    if state is None:
        mask = mask_raw / jnp.sqrt(rowsum)[..., None]  # row-normalised mask, as the reference builds it
        a = qk * mask[None]
        den = jnp.maximum(1.0, jnp.abs(a.sum(-1)))  # sum first, then abs
        return _einsum("bhij,bhjv->bhiv", (a / den[..., None]).astype(v.dtype), v)
    s_old = state["scale"].astype(F32)  # [B,H]
    grow = jnp.exp(lam[:, None] * (jnp.arange(t, dtype=F32) + 1.0))  # prefix decay to block row i, [H,T]
    r = jnp.sqrt(grow[None] * s_old[..., None] + rowsum[None])  # [B,H,T]
    a = qk * (mask_raw[None] / r[..., None])
    cross = grow[None] * jnp.sqrt(s_old)[..., None] / r  # weight of the (normalised) carried sums, [B,H,T]
    qf = q.astype(F32)
    total = a.sum(-1) + cross * jnp.einsum("bhik,bhk->bhi", qf, state["ksum"].astype(F32))
    den = jnp.maximum(1.0, jnp.abs(total))
    out = _einsum("bhij,bhjv->bhiv", (a / den[..., None]).astype(v.dtype), v)
    return out + (cross / den)[..., None] * jnp.einsum("bhik,bhkv->bhiv", qf, state["kv"].astype(F32))


def chunkwise_retention(q: jax.Array, k: jax.Array, v: jax.Array, lam: jax.Array, chunk: int,
                        state: dict | None = None) -> jax.Array:
    """Chunkwise form (spec 3.8) with chunk size `chunk`; returns [B,H,T,dv] float32.

    T is padded with zero rows to a multiple of the chunk (harmless: causal); a block no longer than one chunk
    is computed on its own rows with the chunk-size constants. A state acts as the previous chunks.
    """
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    rows = min(t, chunk)  # rows per computed chunk
    n = -(-t // rows)
    if n * rows != t:
        pad = ((0, 0), (0, 0), (0, n * rows - t), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    mask, rowsum = _decay_mask(lam, rows)
    r = jnp.sqrt(rowsum)  # [H,rows]
    inner_mask = mask / r[..., None]
    last = jnp.exp(lam[:, None] * (chunk - 1.0 - jnp.arange(chunk, dtype=F32)))  # last row of the C-mask
    s_c = last.sum(-1)  # [H]
    u = jnp.exp(lam[:, None] * (jnp.arange(rows, dtype=F32) + 1.0)) / (r / s_c[:, None])  # query decay

    qc, kc, vc = (x.reshape(b, h, n, rows, x.shape[-1]) for x in (q, k, v))
    a = _einsum("bhnik,bhnjk->bhnij", qc, kc) * inner_mask[None, :, None]
    inner_scale = jnp.maximum(1.0, jnp.abs(a).sum(-1))  # abs first, then sum
    inner = _einsum("bhnij,bhnjv->bhniv", (a / inner_scale[..., None]).astype(v.dtype), vc)
    if state is None and n == 1:
        return inner.reshape(b, h, t, dv)  # one chunk, empty state: cross scale 1 <= inner scale

    def scale_of(s: jax.Array) -> jax.Array:  # max over value columns of sum over key rows of |state|, >= 1
        return jnp.maximum(1.0, jnp.abs(s).sum(-2).max(-1))

    if state is None:
        kv0, sig0 = jnp.zeros((b, h, dk, dv), F32), jnp.ones((b, h), F32)
    else:  # carried prefix in torchscale's chunk scaling: U / S_C
        kv0 = state["kv"].astype(F32) * (jnp.sqrt(state["scale"].astype(F32)) / s_c)[..., None, None]
        sig0 = scale_of(kv0)
    w = (last / s_c[:, None])[:, chunk - rows:]  # value decay of each row (rows == chunk whenever n > 1)
    kv_chunks = _einsum("bhnjk,bhnjv->nbhkv", kc, (vc.astype(F32) * w[None, :, None, :, None]))
    cross_decay = jnp.exp(lam * chunk)[None, :, None, None]

    def step(carry, kv_c):
        s, sig = carry
        nxt = s * cross_decay + kv_c
        return (nxt, scale_of(nxt)), (s / sig[..., None, None], sig)

    _, (rec, cs) = jax.lax.scan(step, (kv0, sig0), kv_chunks)  # rec [n,B,H,dk,dv], cs [n,B,H]
    cross = jnp.einsum("bhnik,nbhkv->bhniv", qc.astype(F32) * u[None, :, None, :, None], rec)
    cs = jnp.moveaxis(cs, 0, -1)[..., None]  # [B,H,n,1]
    both = jnp.maximum(inner_scale, cs)
    out = inner / (both / inner_scale)[..., None] + cross / (both / cs)[..., None]
    return out.reshape(b, h, n * rows, dv)[:, :, :t]


def recurrent_retention(q: jax.Array, k: jax.Array, v: jax.Array, lam: jax.Array, valid: jax.Array,
                        state: dict | None = None) -> tuple[jax.Array, dict]:
    """Recurrent form (spec 3.7), a scan over rows; returns ([B,H,T,dv] float32, new layer state).

    s <- s gamma + 1; S <- S sqrt(s_old) gamma / sqrt(s) + kr (x) v / sqrt(s); o = qr . S. Rows where
    `valid` [B,T] is False leave the state unchanged (right padding, finished items).
    """
    b, h, _, dk = q.shape
    dv = v.shape[-1]
    gamma = jnp.exp(lam)[None]  # [1,H]
    if state is None:
        state = {"kv": jnp.zeros((b, h, dk, dv), F32), "ksum": jnp.zeros((b, h, dk), F32),
                 "scale": jnp.zeros((b, h), F32)}
    carry0 = (state["kv"].astype(F32), state["ksum"].astype(F32), state["scale"].astype(F32))

    def step(carry, xs):
        kv, ks, s = carry
        qt, kt, vt, ok = xs
        s_new = s * gamma + 1.0  # from s = 0 this is the reference's first step: scale 1, S = kv
        old = (jnp.sqrt(s) * gamma / jnp.sqrt(s_new))
        new = 1.0 / jnp.sqrt(s_new)
        kv_new = kv * old[..., None, None] + (kt[..., :, None] * vt[..., None, :]) * new[..., None, None]
        ks_new = ks * old[..., None] + kt * new[..., None]
        out = jnp.einsum("bhk,bhkv->bhv", qt, kv_new)
        keep = ok[:, None]
        carry = (jnp.where(keep[..., None, None], kv_new, kv), jnp.where(keep[..., None], ks_new, ks),
                 jnp.where(keep, s_new, s))
        return carry, out

    xs = (jnp.moveaxis(q.astype(F32), 2, 0), jnp.moveaxis(k.astype(F32), 2, 0), jnp.moveaxis(v.astype(F32), 2, 0),
          jnp.moveaxis(valid, 1, 0))
    (kv, ks, s), out = jax.lax.scan(step, carry0, xs)
    dt = state["kv"].dtype
    return jnp.moveaxis(out, 0, 2), {"kv": kv.astype(dt), "ksum": ks.astype(dt), "scale": s.astype(dt)}


def advance_state(state: dict, k: jax.Array, v: jax.Array, lam: jax.Array, count: jax.Array) -> dict:
    """Closed-form state after the first `count` [B] rows of a block (spec 3.7 "Prefill"), per item."""
    t = k.shape[2]
    j = jnp.arange(t)
    live = j[None] < count[:, None]  # [B,T]
    dist = jnp.where(live, count[:, None] - 1 - j[None], 0).astype(F32)
    e = jnp.where(live[:, None], jnp.exp(dist[:, None, :] * lam[None, :, None]), 0.0)  # [B,H,T]
    d = jnp.exp(count.astype(F32)[:, None] * lam[None])  # prefix decay over the block, [B,H]
    s_old = state["scale"].astype(F32)
    carried = d * jnp.sqrt(s_old)
    s_new = d * s_old + e.sum(-1)
    kf = k.astype(F32) * e[..., None]
    kv = carried[..., None, None] * state["kv"].astype(F32) + jnp.einsum("bhjk,bhjv->bhkv", kf, v.astype(F32))
    ks = carried[..., None] * state["ksum"].astype(F32) + kf.sum(2)
    inv = jnp.where(s_new > 0, jax.lax.rsqrt(jnp.where(s_new > 0, s_new, 1.0)), 0.0)
    dt = state["kv"].dtype
    return {"kv": (kv * inv[..., None, None]).astype(dt), "ksum": (ks * inv[..., None]).astype(dt),
            "scale": s_new.astype(dt)}


# ------------------------------------------------------------------------------------------------ the modules


class MultiScaleRetention(nn.Module):
    """Projections, rotation, retention (one of the three forms), per-head group norm, swish gate, out_proj."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, lam: jax.Array, valid: jax.Array,
                 state: dict | None, mode: str, chunk_size: int) -> tuple[jax.Array, dict | None]:
        cfg = self.cfg
        h, dk, dv = _sizes(cfg)
        d = cfg.d_model
        qkvg = _xavier(2**-2.5)  # torchscale's init for q/k/v/g
        q = _dense(cfg, d, ("embed", "heads"), "q_proj", qkvg)(x)
        k = _dense(cfg, d, ("embed", "heads"), "k_proj", qkvg)(x) * (dk**-0.5)  # bias included (3.4)
        v = _dense(cfg, 2 * d, ("embed", "heads"), "v_proj", qkvg)(x)
        g = _dense(cfg, 2 * d, ("embed", "heads"), "g_proj", qkvg)(x)
        bsz, t, _ = x.shape

        def heads(z: jax.Array, width: int) -> jax.Array:  # head-major split -> [B,H,T,width]
            return z.reshape(bsz, t, h, width).transpose(0, 2, 1, 3)

        qr, kr, v = _rotate(heads(q, dk), sin, cos), _rotate(heads(k, dk), sin, cos), heads(v, dv)
        new_state = None
        if mode == "recurrent":
            o, new_state = recurrent_retention(qr, kr, v, lam, valid, state)
            if state is None:
                new_state = None
        else:
            if mode == "parallel":
                o = parallel_retention(qr, kr, v, lam, state)
            else:
                o = chunkwise_retention(qr, kr, v, lam, chunk_size, state)
            if state is not None:
                new_state = advance_state(state, kr, v, lam, valid.sum(-1).astype(jnp.int32))
        # Group norm: per (item, row, head) over the dv value dims, no affine (3.9, U1).
        o = o.transpose(0, 2, 1, 3)
        o = _rms(o, cfg.retnet_group_norm_eps) if cfg.retnet_group_norm == "rmsnorm" \
            else _layernorm(o, cfg.retnet_group_norm_eps)
        z = jax.nn.silu(g.astype(F32)) * o.reshape(bsz, t, h * dv)
        out = _dense(cfg, d, ("heads", "embed"), "out_proj", _xavier(1.0))(z.astype(jnp.dtype(cfg.dtype)))
        return out, new_state


class FeedForward(nn.Module):
    """version < 3: fc1 -> exact GELU -> ffn_layernorm -> fc2 (3.10); version >= 3: fc2(gelu(fc1 x) * gate x)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        f, dt = cfg.ffn_dim, jnp.dtype(cfg.dtype)
        a = _dense(cfg, f, ("embed", "mlp"), "fc1", _TORCH_LINEAR)(x)
        a = jax.nn.gelu(a.astype(F32), approximate=False)  # torch F.gelu is the erf form
        if cfg.retnet_use_glu:
            a = a * _dense(cfg, f, ("embed", "mlp"), "gate", _TORCH_LINEAR)(x).astype(F32)
        else:
            a = Norm(cfg.retnet_layernorm_eps, rms=False, dtype=F32, param_dtype=jnp.dtype(cfg.param_dtype),
                     name="ffn_layernorm")(a)
        out = _dense(cfg, cfg.d_model, ("mlp", "embed"), "fc2", _TORCH_LINEAR)(a.astype(dt))
        return nn.Dropout(_dropout_rate(cfg))(out, deterministic=deterministic)


def _norm(cfg: ModelConfig, name: str) -> Norm:
    return Norm(cfg.retnet_layernorm_eps, rms=not cfg.retnet_use_layernorm, dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype), name=name)


class RetNetDecoderLayer(nn.Module):
    """Pre-norm: h = x + MSR(LN(x)); y = h + FFN(LN(h)) (3.2). The form, chunk size and dropout switch are
    attributes (call arguments are arrays only, as remat needs)."""

    cfg: ModelConfig
    mode: str = "parallel"
    chunk_size: int = 512
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, lam: jax.Array, valid: jax.Array,
                 state: dict | None) -> tuple[jax.Array, dict | None]:  # fmt: skip
        cfg = self.cfg
        r, new_state = MultiScaleRetention(cfg, name="retention")(
            _norm(cfg, "retention_layer_norm")(x), sin, cos, lam, valid, state, self.mode, self.chunk_size)
        x = x + nn.Dropout(_dropout_rate(cfg))(r, deterministic=self.deterministic)
        x = x + FeedForward(cfg, name="ffn")(_norm(cfg, "final_layer_norm")(x), self.deterministic)
        return x, new_state


class RetNetDecoder(nn.Module):
    """The backbone: input embeddings in, hidden states after the final norm out (3.1).

    Param tree (names = reference keys under `model.`): `retnet_rel_pos/{angle,decay}`, `layers_{i}/...`,
    `layer_norm/{scale,bias}`.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None, valid: jax.Array,
                 state: RetNetState | None = None, deterministic: bool = True, step: bool = False,
                 mode: str | None = None, chunk_size: int | None = None) -> tuple[jax.Array, RetNetState | None]:
        """x [B,S,D], valid [B,S] bool (a prefix of each row: right padding); `positions` is ignored -- the
        rotation/decay index is the sequence index (plus the state's per-item offset). Returns
        (h [B,S,D], new state or None when `state` is None). `mode` None = cfg.retnet_mode, except for decode
        steps (`step`), which use the parallel form with the carried state: it equals the whole-sequence parallel
        output to round-off (a 1-row chunkwise step is the noisiest form, spec reference-retnet 3.12)."""
        cfg = self.cfg
        mode = str(mode or ("parallel" if step else cfg.retnet_mode))
        if mode not in MODES:
            raise ValueError(f"retnet mode {mode!r}: expected one of {MODES}")
        chunk_size = int(chunk_size or cfg.retnet_chunk_size)
        if chunk_size < 1:
            raise ValueError(f"retnet chunk size {chunk_size}: expected >= 1")
        del positions
        bsz, t, _ = x.shape
        valid = valid.astype(bool)

        angle, lam = RetNetRelPos(cfg, name="retnet_rel_pos")()
        offset = jnp.zeros((bsz,), jnp.int32) if state is None else state["offset"]
        pos = (offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None]).astype(F32)  # [B,S]
        theta = pos[:, None, :, None] * angle  # [B,1,S,dk], product rounded to f32 before sin/cos
        sin, cos = jnp.sin(theta), jnp.cos(theta)

        x = nn.Dropout(_dropout_rate(cfg))(x.astype(jnp.dtype(cfg.dtype)), deterministic=deterministic)
        new_state: RetNetState | None = None
        if state is not None:
            new_state = {"offset": offset + valid.sum(-1).astype(jnp.int32)}
        layer_cls = backbone.remat_layer(RetNetDecoderLayer, cfg)
        for i in range(cfg.n_layers):
            name = f"layers_{i}"
            x, layer_state = layer_cls(cfg, mode, chunk_size, deterministic, name=name)(
                x, sin, cos, lam, valid, None if state is None else state[name])
            if new_state is not None:
                new_state[name] = layer_state
        return _norm(cfg, "layer_norm")(x), new_state


def _config_from_keys(tensors, fields: dict, has_metadata: bool) -> dict:
    """Config fields the reference keys of a RetNet checkpoint give (spec 7.6)."""
    fc1 = tensors.get("model.layers.0.ffn.fc1.weight")
    return {"ffn": int(fc1.shape[0]) if fc1 is not None else None}


backbone.register(backbone.Backbone(
    name="retnet",
    decoder=RetNetDecoder,
    init_state=init_state,
    state_axes=state_logical_axes,
    matches_keys=lambda keys: any(".retention." in k for k in keys),
    config_from_keys=_config_from_keys,
    lora_targets=(("layers.",), ("retention.k_proj",)),
))  # fmt: skip

__all__ = [
    "RetNetDecoder", "RetNetDecoderLayer", "MultiScaleRetention", "FeedForward", "RetNetRelPos", "Norm",
    "RetNetState", "init_state", "state_logical_axes", "rel_pos_angle", "rel_pos_decay", "parallel_retention",
    "chunkwise_retention", "recurrent_retention", "advance_state", "MODES", "GROUP_NORMS",
]
