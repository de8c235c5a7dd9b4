"""AR and NAR generation as compiled loops (spec reference-model.md 6.1-6.3), and continuous batching.

AR: `prefill` runs text · sep · rvq(0) · sep · prom · sep of new items into a KV cache (Llama) or a recurrent
state (RetNet) and gives the logits of the last `causal_size` rows; `decode` then samples and appends
`causal_size` tokens per step for every active slot inside one `lax.while_loop`; each slot stops on its own
(stop token among its tokens, or its step limit). A `DecodeState` holds B slots; `insert` puts prefilled
items into free slots, so a job's batch never waits for its longest member (`ARScheduler`). `ar_generate`
is the one-shot form (every slot filled once). The reference recomputes the whole sequence each step;
`ar_generate_full` does the same, for checking and benchmarking.

NAR: one full pass per level 1..N-1 inside one `lax.fori_loop` (`nar_generate`).

Shapes: B slots, T/P/R text/prompt/response buckets, Q levels, C causal_size, V logits width, N max tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from valle_jax import sampling
from valle_jax.config import ModelConfig
from valle_jax.layout import Batch, before_stop, make_batch, prefix_rows
from valle_jax.models import backbone
from valle_jax.models.valle import VALLE

Array = jax.Array


class ARResult(NamedTuple):
    tokens: Array  # [B, N] every token appended, in order (the reference's raw sequence; pad after n_raw)
    n_raw: Array  # [B] tokens appended while the item was running (iterations * causal_size)
    length: Array  # [B] tokens before the first stop token (the reference's returned sequence)


class DecodeState(NamedTuple):
    """B decoding slots. Every leaf is batch-first, so a slot is replaced with `.at[slots].set`."""

    cache: Any  # KV cache or retention state
    logits: Array  # [B, C, V] logits that predict the next C tokens
    tokens: Array  # [B, N] generated tokens
    count: Array  # [B] tokens generated so far (= the history length of the samplers)
    active: Array  # [B] still generating
    resp_start: Array  # [B] prefix length (unified positions continue from it)
    limit: Array  # [B] max tokens of the slot (a multiple of C)
    params: sampling.SamplingParams  # per-slot sampler settings
    mu: Array  # [B] mirostat state
    beam: Array  # [B] beam scores
    finite: Array  # [B] every logit the slot sampled from was finite (NaN weights/activations are reported)


def greedy_params(batch: int) -> sampling.SamplingParams:
    return sampling.make_params(batch, temperature=0.0)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Any:
    """The backbone's incremental state (a KV cache, a retention state...) for `batch` slots of `max_len` rows."""
    return backbone.get(cfg.arch_type).init_state(cfg, batch, max_len)


def _rows(x_BSV: Array, start_B: Array, n: int) -> Array:
    """x[b, start_b : start_b + n] for every item."""
    idx = start_B[:, None] + jnp.arange(n)[None, :]
    return jnp.take_along_axis(x_BSV, idx[..., None], axis=1)


def _ar_batch(batch: Batch, resp_BN: Array, resp_len_B: Array) -> Batch:
    return batch._replace(resp=resp_BN[..., None], resp_len=resp_len_B, level=jnp.zeros_like(batch.level))


def _ar_logits(model: VALLE, params: dict, h_BCD: Array) -> Array:
    return model.apply({"params": params}, h_BCD, jnp.zeros((h_BCD.shape[0],), jnp.int32), True, method=VALLE.logits)


def empty_state(cfg: ModelConfig, slots: int, max_tokens: int, cache_len: int) -> DecodeState:
    C = cfg.causal_size
    N = max(C, -(-max_tokens // C) * C)
    V = max(cfg.head_widths)
    params = greedy_params(slots)
    zeros = jnp.zeros((slots,), jnp.int32)
    return DecodeState(init_cache(cfg, slots, cache_len), jnp.zeros((slots, C, V), jnp.float32),
                       jnp.zeros((slots, N), jnp.int32), zeros, jnp.zeros((slots,), bool), zeros, zeros,
                       params, sampling.init_mirostat_mu(params), sampling.init_beam_scores(slots),
                       jnp.ones((slots,), bool))  # fmt: skip


def prefill(cfg: ModelConfig, params: dict, batch: Batch, cache_len: int) -> tuple[Any, Array, Array]:
    """Run the AR prefixes of `batch` (its resp is ignored) -> (cache, logits [b, C, V], prefix length [b])."""
    model = VALLE(cfg)
    b = batch.text.shape[0]
    prefix = _ar_batch(batch, jnp.zeros((b, 1), jnp.int32), jnp.zeros((b,), jnp.int32))
    n_rows = prefix_rows(cfg, batch.text.shape[1], batch.prom.shape[1])
    x, lay = model.apply({"params": params}, prefix, n_rows, method=VALLE.embed)
    cache = init_cache(cfg, b, cache_len)
    h, cache = model.apply({"params": params}, x, lay.positions, lay.valid, cache, method=VALLE.backbone)
    return cache, _ar_logits(model, params, _rows(h, lay.length - cfg.causal_size, cfg.causal_size)), lay.length


def insert(state: DecodeState, slots: Array, cache: Any, logits: Array, resp_start: Array, limit: Array,
           params: sampling.SamplingParams) -> DecodeState:  # fmt: skip
    """Put b prefilled items into `slots` [b] (an index >= B is dropped: padding of the prefill bucket)."""
    C = logits.shape[1]
    put = lambda old, new: old.at[slots].set(new.astype(old.dtype), mode="drop")  # noqa: E731
    limit = jnp.maximum(limit // C, 1) * C
    return state._replace(
        cache=jax.tree.map(put, state.cache, cache),
        logits=put(state.logits, logits),
        tokens=put(state.tokens, jnp.zeros((slots.shape[0], state.tokens.shape[1]), jnp.int32)),
        count=put(state.count, jnp.zeros_like(slots)),
        active=put(state.active, slots < state.active.shape[0]),
        resp_start=put(state.resp_start, resp_start),
        limit=put(state.limit, jnp.minimum(limit, state.tokens.shape[1])),
        params=jax.tree.map(put, state.params, params),
        mu=put(state.mu, sampling.init_mirostat_mu(params)),
        beam=put(state.beam, sampling.init_beam_scores(slots.shape[0])),
        finite=put(state.finite, jnp.ones(slots.shape, bool)),
    )


def decode(cfg: ModelConfig, params: dict, state: DecodeState, key: Array, max_iters: int) -> tuple[DecodeState, Array]:
    """Up to `max_iters` AR steps for every active slot (stops early when no slot is active)."""
    model = VALLE(cfg)
    C = cfg.causal_size
    stop = cfg.stop_token
    B, N = state.tokens.shape
    unified = cfg.experimental.unified_position_ids

    def cond(carry):
        i, s, _ = carry
        return (i < max_iters) & jnp.any(s.active)

    def body(carry):
        i, s, key = carry
        key, sub = jax.random.split(key)
        out = sampling.sample_ar(s.logits, s.tokens, s.count, s.params, sub, mirostat_mu=s.mu, beam_scores=s.beam,
                                 stop_token=stop)  # fmt: skip
        new = out.tokens.astype(jnp.int32)
        written = jax.vmap(lambda row, tok, at: jax.lax.dynamic_update_slice(row, tok, (at,)))(s.tokens, new, s.count)
        tokens = jnp.where(s.active[:, None], written, s.tokens)
        count = jnp.where(s.active, s.count + C, s.count)
        active = s.active & ~jnp.any(new == stop, axis=-1) & (count < s.limit)
        x = model.apply({"params": params}, jnp.where(s.active[:, None], new, 0), method=VALLE.embed_ar_tokens)
        t = s.count[:, None] + jnp.arange(C)[None, :]
        pos = (s.resp_start[:, None] + t) if unified else t
        h, cache = model.apply({"params": params}, x, pos.astype(jnp.int32), jnp.broadcast_to(active[:, None], (B, C)),
                               s.cache, step=True, method=VALLE.backbone)  # fmt: skip
        logits = jnp.where(active[:, None, None], _ar_logits(model, params, h), s.logits)
        finite = s.finite & ~(s.active & ~jnp.isfinite(s.logits).all(axis=(1, 2)))
        s = s._replace(cache=cache, logits=logits, tokens=tokens, count=count, active=active,
                       mu=jnp.where(s.active, out.mirostat_mu, s.mu), beam=out.beam_scores, finite=finite)  # fmt: skip
        return i + 1, s, key

    _, state, key = jax.lax.while_loop(cond, body, (jnp.int32(0), state, key))
    return state, key


def stop_result(tokens_BN: Array, count_B: Array, stop: int) -> ARResult:
    """Tokens before each item's first stop token (among its first `count` tokens), as the reference returns."""
    idx = jnp.arange(tokens_BN.shape[1])[None, :]
    is_stop = (tokens_BN == stop) & (idx < count_B[:, None])
    length = jnp.where(jnp.any(is_stop, -1), jnp.argmax(is_stop, -1), count_B).astype(jnp.int32)
    return ARResult(tokens_BN, count_B, length)


def ar_generate(
    cfg: ModelConfig,
    params: dict,
    batch: Batch,
    max_steps: int,
    *,
    key: Array | None = None,
    sampling_params: sampling.SamplingParams | None = None,
    max_steps_B: Array | None = None,
) -> ARResult:
    """Level-0 tokens for every item of `batch` with the KV cache / recurrent state: max_steps // causal_size
    iterations at most; an item stops when the stop token is among its sampled tokens or at max_steps_B."""
    C = cfg.causal_size
    B = batch.text.shape[0]
    n_iter = max(1, max_steps // C)
    cache_len = prefix_rows(cfg, batch.text.shape[1], batch.prom.shape[1]) + n_iter * C
    state = empty_state(cfg, B, n_iter * C, cache_len)
    cache, logits, start = prefill(cfg, params, batch, cache_len)
    limit = jnp.full((B,), n_iter * C, jnp.int32) if max_steps_B is None else jnp.asarray(max_steps_B, jnp.int32)
    sp = sampling_params if sampling_params is not None else greedy_params(B)
    state = insert(state, jnp.arange(B), cache, logits, start, limit, sp)
    state, _ = decode(cfg, params, state, jax.random.key(0) if key is None else key, n_iter)
    return stop_result(state.tokens, state.count, cfg.stop_token)


def ar_generate_full(cfg: ModelConfig, params: dict, batch: Batch, max_steps: int, *, key: Array | None = None,
                     sampling_params: sampling.SamplingParams | None = None) -> ARResult:  # fmt: skip
    """The reference's loop: every step recomputes the whole sequence (no cache). Same results, O(N^2) work."""
    model = VALLE(cfg)
    C = cfg.causal_size
    B = batch.text.shape[0]
    n_iter = max(1, max_steps // C)
    N = n_iter * C
    stop = cfg.stop_token
    sp = sampling_params if sampling_params is not None else greedy_params(B)

    def cond(carry):
        i, _, _, active, _, _ = carry
        return (i < n_iter) & jnp.any(active)

    def body(carry):
        i, buf, count, active, mu, key = carry
        logits, lay = model.apply({"params": params}, _ar_batch(batch, buf, jnp.full((B,), i * C, jnp.int32)), uniform_level=True)
        key, sub = jax.random.split(key)
        out = sampling.sample_ar(_rows(logits, lay.length - C, C), buf, count, sp, sub, mirostat_mu=mu, stop_token=stop)
        buf = jax.lax.dynamic_update_slice(buf, out.tokens.astype(jnp.int32), (0, i * C))
        count = jnp.where(active, count + C, count)
        active = active & ~jnp.any(out.tokens == stop, axis=-1)
        return i + 1, buf, count, active, out.mirostat_mu, key

    init = (jnp.int32(0), jnp.zeros((B, N), jnp.int32), jnp.zeros((B,), jnp.int32), jnp.ones((B,), bool),
            sampling.init_mirostat_mu(sp), jax.random.key(0) if key is None else key)  # fmt: skip
    _, buf, count, _, _, _ = jax.lax.while_loop(cond, body, init)
    return stop_result(buf, count, stop)


def nar_generate(
    cfg: ModelConfig,
    params: dict,
    batch: Batch,
    level0_BR: Array,
    *,
    max_levels: int | None = None,
    key: Array | None = None,
    sampling_params: sampling.SamplingParams | None = None,
) -> Array:
    """Codes [B, R, Q]: column 0 is `level0_BR`, columns 1..max_levels from one pass per level (spec 6.3).
    Response lengths are `batch.resp_len`; rows past them are padding. Columns beyond max_levels stay 0.
    The NAR samplers get temperature / min_temperature / top_k / top_p only, as the reference."""
    model = VALLE(cfg)
    Q = cfg.resp_levels
    top = Q - 1 if max_levels is None else min(max_levels, Q - 1)
    B, R = level0_BR.shape
    sp = sampling_params if sampling_params is not None else greedy_params(B)
    key = jax.random.key(0) if key is None else key
    codes = jnp.zeros((B, R, Q), jnp.int32).at[:, :, 0].set(level0_BR.astype(jnp.int32))

    def body(level, carry):
        codes, key = carry
        lvl = jnp.full((B,), level, jnp.int32)
        logits, lay = model.apply({"params": params}, batch._replace(resp=codes, level=lvl), uniform_level=True)
        key, sub = jax.random.split(key)
        tokens = sampling.sample_nar(_rows(logits, lay.resp_start, R), sp, sub)
        codes = jax.lax.dynamic_update_slice(codes, tokens[:, :, None].astype(jnp.int32), (0, 0, level))
        return codes, key

    codes, _ = jax.lax.fori_loop(1, top + 1, body, (codes, key))
    return codes


# ---------------------------------------------------------------------------------------------------------
# continuous batching

# Module-level compiled programs: every scheduler of a job (and of the next job) reuses them.
_prefill_jit = jax.jit(prefill, static_argnums=(0, 3))
_insert_jit = jax.jit(insert)
_decode_jit = jax.jit(decode, static_argnums=(0, 4))


class ARScheduler:
    """Continuous batching of AR decoding for jobs: when a slot's item stops, the slot takes the next item.

    Host loop: `submit` items (numpy text ids, prompt codes, per-item sampler settings); `run` refills free
    slots (one prefill program per (bucket size, text bucket, prompt bucket)), decodes `chunk` steps, and
    yields finished items. Shapes are static: `slots`, `max_tokens`, the text/prompt bucket maxima.
    """

    def __init__(self, cfg: ModelConfig, params: dict, *, slots: int, max_tokens: int, text_bucket: int,
                 prom_bucket: int, chunk: int = 16, seed: int = 0, continuous: bool = True):  # fmt: skip
        self.cfg, self.params = cfg, params
        self.slots, self.chunk, self.continuous = slots, chunk, continuous
        self.text_bucket, self.prom_bucket = text_bucket, prom_bucket
        self.cache_len = prefix_rows(cfg, text_bucket, prom_bucket) + max(max_tokens, cfg.causal_size) + cfg.causal_size
        self.state = empty_state(cfg, slots, max_tokens, self.cache_len)
        self.key = jax.random.key(seed)
        self.owner: list[Any] = [None] * slots  # the item id held by each slot
        self.queue: list[tuple[Any, dict]] = []
        self.steps = 0

    def submit(self, item_id: Any, text: np.ndarray, prom: np.ndarray, max_tokens: int,
               params: sampling.SamplingParams | None = None) -> None:  # fmt: skip
        """Queue one item. `params` is a batch-of-1 SamplingParams (default greedy)."""
        if len(text) > self.text_bucket or len(prom) > self.prom_bucket:
            raise ValueError(f"item {item_id}: text {len(text)} / prompt {len(prom)} exceed the buckets "
                             f"{self.text_bucket} / {self.prom_bucket}")  # fmt: skip
        self.queue.append((item_id, {"text": text, "prom": prom, "max_tokens": max_tokens, "params": params or greedy_params(1)}))

    def _refill(self) -> None:
        free = [i for i, o in enumerate(self.owner) if o is None]
        if not free or not self.queue:
            return
        if not self.continuous and any(o is not None for o in self.owner):
            return  # static batching: wait until the whole batch is done
        take = [self.queue.pop(0) for _ in range(min(len(free), len(self.queue)))]
        n = 1
        while n < len(take):
            n *= 2
        n = min(n, self.slots)
        items = [{"text": t["text"], "prom": t["prom"], "resp": np.zeros((1, 1), np.int32)} for _, t in take]
        items += [items[0]] * (n - len(items))  # bucket padding: inserted at a dropped index
        batch = make_batch(items, pad_to={"text": self.text_bucket, "prom": self.prom_bucket})
        batch = batch._replace(text=batch.text[:, : self.text_bucket], prom=batch.prom[:, : self.prom_bucket])
        cache, logits, start = _prefill_jit(self.cfg, self.params, batch, self.cache_len)
        slots = np.full((n,), self.slots, np.int32)
        slots[: len(take)] = free[: len(take)]
        limit = np.array([t["max_tokens"] for _, t in take] + [1] * (n - len(take)), np.int32)
        sp = [t["params"] for _, t in take] + [take[0][1]["params"]] * (n - len(take))
        self.state = _insert_jit(self.state, jnp.asarray(slots), cache, logits, start, jnp.asarray(limit),
                                 sampling.stack_params(sp))
        for (item_id, _), s in zip(take, free):
            self.owner[s] = item_id

    def run(self):
        """Yield (item_id, raw tokens [n_raw], tokens before the stop [length], finite) as items finish;
        finite is False when the item's logits held NaN/inf."""
        stop = self.cfg.stop_token
        while self.queue or any(o is not None for o in self.owner):
            self._refill()
            self.state, self.key = _decode_jit(self.cfg, self.params, self.state, self.key, self.chunk)
            self.steps += self.chunk
            active = np.asarray(self.state.active)
            done = [i for i, o in enumerate(self.owner) if o is not None and not active[i]]
            if not done:
                continue
            tokens, count, finite = (np.asarray(a) for a in (self.state.tokens, self.state.count, self.state.finite))
            for i in done:
                raw = tokens[i, : count[i]]
                yield self.owner[i], raw, before_stop(raw, stop), bool(finite[i])
                self.owner[i] = None
