"""AR and NAR generation as compiled loops (spec reference-model.md 6.1-6.3).

The AR pass prefills text · sep · rvq(0) · sep · prom · sep into a KV cache (Llama) or a recurrent state
(RetNet) and then decodes `causal_size` tokens per step inside one `lax.while_loop`, each item stopping on its
own. The reference recomputes the whole sequence every step; `ar_generate(..., cached=False)` does the same
(for checking and benchmarking). NAR passes fill levels 1..N-1, one full pass per level, inside one
`lax.fori_loop`. Shapes are static: callers pad batches to buckets (see `bucket`).

Shapes: B batch, T/P/R text/prompt/response buckets, Q levels, C causal_size, V logits width, N steps * C.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from valle_jax.config import ModelConfig
from valle_jax.models.valle import VALLE, Batch

Array = jax.Array
# sampler(logits [B, C, V] float32, history [B, N] int32, history_len [B], key, state) -> (tokens [B, C], state)
ARSampler = Callable[[Array, Array, Array, Array, Any], tuple[Array, Any]]
# sampler(logits [B, R, V] float32, key) -> tokens [B, R]
NARSampler = Callable[[Array, Array], Array]


class ARResult(NamedTuple):
    tokens: Array  # [B, N] every token appended, in order (the reference's raw sequence; pad after n_raw)
    n_raw: Array  # [B] tokens appended while the item was running (iterations * causal_size)
    length: Array  # [B] tokens before the first stop token (the reference's returned sequence)


def bucket(n: int, buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048)) -> int:
    """The smallest bucket >= n (multiples of the largest beyond it): a job compiles a few shapes only."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def greedy_ar(logits_BCV: Array, history: Array, history_len: Array, key: Array, state: Any) -> tuple[Array, Any]:
    return jnp.argmax(logits_BCV, axis=-1).astype(jnp.int32), state


def greedy_nar(logits_BRV: Array, key: Array) -> Array:
    return jnp.argmax(logits_BRV, axis=-1).astype(jnp.int32)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Any:
    """The backbone's incremental state: a preallocated KV cache (Llama) or the retention state (RetNet)."""
    if cfg.arch_type == "retnet":
        from valle_jax.models.retnet import init_state

        return init_state(cfg, batch)
    from valle_jax.models.llama import init_kv_cache

    return init_kv_cache(cfg, batch, max_len)


def _rows(x_BSV: Array, start_B: Array, n: int) -> Array:
    """x[b, start_b : start_b + n] for every item."""
    idx = start_B[:, None] + jnp.arange(n)[None, :]
    return jnp.take_along_axis(x_BSV, idx[..., None], axis=1)


def _ar_batch(batch: Batch, resp_BN: Array, resp_len_B: Array) -> Batch:
    return batch._replace(resp=resp_BN[..., None], resp_len=resp_len_B, level=jnp.zeros_like(batch.level))


def ar_generate(
    cfg: ModelConfig,
    params: dict,
    batch: Batch,
    max_steps: int,
    *,
    key: Array | None = None,
    sampler: ARSampler = greedy_ar,
    sampler_state: Any = None,
    max_steps_B: Array | None = None,
    cached: bool = True,
) -> ARResult:
    """Level-0 tokens for every item of `batch` (its resp is ignored). Runs max_steps // causal_size iterations
    at most; an item stops when the stop token is among its sampled tokens or at its own max_steps_B."""
    model = VALLE(cfg)
    C = cfg.causal_size
    n_iter = max(1, max_steps // C)
    N = n_iter * C
    B = batch.text.shape[0]
    stop = cfg.stop_token
    key = jax.random.key(0) if key is None else key
    limit_B = jnp.full((B,), n_iter, jnp.int32) if max_steps_B is None else jnp.maximum(max_steps_B // C, 1)
    prefix = _ar_batch(batch, jnp.zeros((B, 1), jnp.int32), jnp.zeros((B,), jnp.int32))
    zeros_B = jnp.zeros((B,), jnp.int32)

    def logits_of(h_BCD):
        return model.apply({"params": params}, h_BCD, zeros_B, method=VALLE.logits)

    if cached:
        n_prefix = batch.text.shape[1] + batch.prom.shape[1] + (4 if cfg.has_rvq_token else 2)
        cache = init_cache(cfg, B, n_prefix + N)
        x, lay = model.apply({"params": params}, prefix, n_prefix, method=VALLE.embed)
        h, cache = model.apply({"params": params}, x, lay.positions, lay.valid, cache, method=VALLE.backbone)
        first_logits = logits_of(_rows(h, lay.length - C, C))
        resp_start = lay.length  # unified positions continue from the prefix length
    else:
        cache, first_logits, resp_start = None, None, None

    def full_logits(buf, i):
        x_batch = _ar_batch(batch, buf, jnp.full((B,), i * C, jnp.int32))
        logits, lay = model.apply({"params": params}, x_batch)
        return _rows(logits, lay.length - C, C)

    def cond(carry):
        i, _, _, _, stopped, _, _, _ = carry
        return (i < n_iter) & ~jnp.all(stopped)

    def body(carry):
        i, cache, logits, buf, stopped, n_run, key, s_state = carry
        if not cached:
            logits = full_logits(buf, i)
        key, sub = jax.random.split(key)
        tokens, s_state = sampler(logits, buf, jnp.full((B,), i * C, jnp.int32), sub, s_state)
        buf = jax.lax.dynamic_update_slice(buf, tokens.astype(jnp.int32), (0, i * C))
        n_run = jnp.where(stopped, n_run, (i + 1) * C)
        stopped = stopped | jnp.any(tokens == stop, axis=-1) | (i + 1 >= limit_B)
        if cached:
            x = model.apply({"params": params}, tokens, method=VALLE.embed_ar_tokens)
            t = i * C + jnp.arange(C)[None, :]
            pos = t if not cfg.experimental.unified_position_ids else resp_start[:, None] + t
            h, cache = model.apply({"params": params}, x, pos.astype(jnp.int32), jnp.ones((B, C), bool), cache,
                                   method=VALLE.backbone)  # fmt: skip
            logits = logits_of(h)
        return i + 1, cache, logits, buf, stopped, n_run, key, s_state

    V = max(cfg.head_widths)
    init = (
        jnp.int32(0), cache, first_logits if cached else jnp.zeros((B, C, V), jnp.float32),
        jnp.zeros((B, N), jnp.int32), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), key, sampler_state,
    )  # fmt: skip
    _, _, _, buf, _, n_run, _, _ = jax.lax.while_loop(cond, body, init)
    idx = jnp.arange(N)[None, :]
    is_stop = (buf == stop) & (idx < n_run[:, None])
    length = jnp.where(jnp.any(is_stop, -1), jnp.argmax(is_stop, -1), n_run).astype(jnp.int32)
    return ARResult(buf, n_run, length)


def nar_generate(
    cfg: ModelConfig,
    params: dict,
    batch: Batch,
    level0_BR: Array,
    *,
    max_levels: int | None = None,
    key: Array | None = None,
    sampler: NARSampler = greedy_nar,
) -> Array:
    """Codes [B, R, Q]: column 0 is `level0_BR`, columns 1..max_levels from one pass per level (spec 6.3).
    Response lengths are `batch.resp_len`; rows past them are padding. Columns beyond max_levels stay 0."""
    model = VALLE(cfg)
    Q = cfg.resp_levels
    top = Q - 1 if max_levels is None else min(max_levels, Q - 1)
    B, R = level0_BR.shape
    key = jax.random.key(0) if key is None else key
    codes = jnp.zeros((B, R, Q), jnp.int32).at[:, :, 0].set(level0_BR.astype(jnp.int32))

    def body(level, carry):
        codes, key = carry
        lvl = jnp.full((B,), level, jnp.int32)
        logits, lay = model.apply({"params": params}, batch._replace(resp=codes, level=lvl))
        key, sub = jax.random.split(key)
        tokens = sampler(_rows(logits, lay.resp_start, R), sub)
        codes = jax.lax.dynamic_update_slice(codes, tokens[:, :, None].astype(jnp.int32), (0, 0, level))
        return codes, key

    codes, _ = jax.lax.fori_loop(1, top + 1, body, (codes, key))
    return codes
