"""AR and NAR generation as compiled loops (spec reference-model.md 6.1-6.3), and continuous batching.

AR: `prefill` runs text · sep · rvq(0) · sep · prom · sep of new items into a KV cache (Llama) or a recurrent
state (RetNet) of the prefix rows only and gives the logits of the last `causal_size` rows; `insert` writes
those rows into free slots of a `DecodeState`; `decode` then samples and appends `causal_size` tokens per step
(one for a mirostat item, as the reference) for every active slot, a fixed number of steps per call, so a
decode program has no data-dependent control flow (on a GPU every `while` condition or `cond` predicate is a
device-to-host read per step); the host checks between calls whether any slot is still running. Each slot
stops on its own (stop token among its tokens, or its step limit), so a job's batch never waits for its longest
member (`ARScheduler`). The decode state is donated to `insert` and `decode` (updated in place, never copied).
`ar_generate` is the one-shot form (every slot filled once; chunks of fixed steps inside a `while` that exits
when all items stopped). The reference recomputes the whole sequence each step; `ar_generate_full` does the
same, for checking and benchmarking.

Beam search (`beam_width` W > 1, causal_size 1): an item takes W consecutive slots that start from the same
prefill; each step the W rows' candidates compete (the reference's naive beam) and row 0 is the item's result.

NAR: one full pass per level 1..N-1 inside one `lax.fori_loop` (`nar_generate`).

Shapes: B slots, T/P/R text/prompt/response buckets, Q levels, C causal_size, V logits width, N max tokens.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from valle_jax import parallel, sampling
from valle_jax.config import ModelConfig
from valle_jax.layout import Batch, before_stop, make_batch, prefix_rows
from valle_jax.models import backbone
from valle_jax.models.lora import LoraStack, lora_context
from valle_jax.models.valle import VALLE

Array = jax.Array
ATTEND_BLOCK = 256  # decode attention reads the cache rows in use rounded up to this (see ARScheduler)


class ARResult(NamedTuple):
    tokens: Array  # [B, N] every token appended, in order (the reference's raw sequence; pad after n_raw)
    n_raw: Array  # [B] tokens appended while the item was running
    length: Array  # [B] tokens before the first stop token (the reference's returned sequence)


class DecodeState(NamedTuple):
    """B decoding slots. Every leaf is batch-first, so a slot is replaced with `.at[slots].set`."""

    cache: Any  # KV cache or retention state
    logits: Array  # [B, C, V] logits of the last C rows (they predict the next C tokens)
    tokens: Array  # [B, N] generated tokens
    count: Array  # [B] tokens generated so far (= the history length of the samplers)
    steps: Array  # [B] decode steps taken (the reference's loop counter: count / C, or count for mirostat)
    active: Array  # [B] still generating
    resp_start: Array  # [B] prefix length (unified positions continue from it)
    limit: Array  # [B] max tokens of the slot (a multiple of C; the item stops after limit / C steps)
    last_seen: Array  # [B, V] position of each token's latest occurrence (-1: none): the repetition penalty's input
    params: sampling.SamplingParams  # per-slot sampler settings
    mu: Array  # [B] mirostat state
    beam: Array  # [B] beam scores
    finite: Array  # [B] every logit the slot sampled from was finite (NaN weights/activations are reported)
    lora: Array  # [B] the slot's LoRA in the job's models.lora.LoraStack (-1: none)


def greedy_params(batch: int, *, beam_width: int = 0, mirostat_shared: bool = True) -> sampling.SamplingParams:
    return sampling.make_params(batch, temperature=0.0, beam_width=beam_width, mirostat_shared=mirostat_shared)


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


def token_capacity(cfg: ModelConfig, max_tokens: int) -> int:
    """Columns of a DecodeState's token buffer for items of up to `max_tokens` tokens (a multiple of C)."""
    C = cfg.causal_size
    return max(C, -(-max_tokens // C) * C)


def empty_state(cfg: ModelConfig, slots: int, max_tokens: int, cache_len: int,
                template: sampling.SamplingParams | None = None) -> DecodeState:  # fmt: skip
    """`slots` free slots. `template`'s static options (beam_width, mirostat_shared) are the state's: every item
    inserted must share them."""
    C = cfg.causal_size
    N = token_capacity(cfg, max_tokens)
    V = max(cfg.head_widths)
    params = greedy_params(slots, beam_width=template.beam_width if template else 0,
                           mirostat_shared=template.mirostat_shared if template else True)  # fmt: skip
    zeros = lambda: jnp.zeros((slots,), jnp.int32)  # noqa: E731 - distinct buffers: the state is donated
    return DecodeState(init_cache(cfg, slots, cache_len), jnp.zeros((slots, C, V), jnp.float32),
                       jnp.zeros((slots, N), jnp.int32), zeros(), zeros(), jnp.zeros((slots,), bool), zeros(), zeros(),
                       jnp.full((slots, V), -1, jnp.int32), params, sampling.init_mirostat_mu(params),
                       sampling.init_beam_scores(slots), jnp.ones((slots,), bool), jnp.full((slots,), -1, jnp.int32))  # fmt: skip


def prefill(cfg: ModelConfig, params: dict, batch: Batch, lora: LoraStack | None = None,
            lora_index: Array | None = None) -> tuple[Any, Array, Array]:  # fmt: skip
    """Run the AR prefixes of `batch` (its resp is ignored) -> (state of the prefix rows only, logits [b, C, V],
    prefix length [b]). `insert` writes the state's rows into longer slots. `lora` / `lora_index` [b]: the
    job's stacked LoRAs and each item's (-1: none)."""
    model = VALLE(cfg)
    b = batch.text.shape[0]
    prefix = _ar_batch(batch, jnp.zeros((b, 1), jnp.int32), jnp.zeros((b,), jnp.int32))
    n_rows = prefix_rows(cfg, batch.text.shape[1], batch.prom.shape[1])
    with _ar_lora(lora, lora_index, b):
        x, lay = model.apply({"params": params}, prefix, n_rows, method=VALLE.embed)
        cache = init_cache(cfg, b, n_rows)
        h, cache = model.apply({"params": params}, x, lay.positions, lay.valid, cache, method=VALLE.backbone)
    return cache, _ar_logits(model, params, _rows(h, lay.length - cfg.causal_size, cfg.causal_size)), lay.length


def _ar_lora(lora: LoraStack | None, index_B: Array | None, batch: int) -> Any:
    """The LoRA context of an AR pass: level 0 for every item (a LoRA's rvq_levels apply)."""
    if lora is None:
        return lora_context(None)
    index_B = jnp.full((batch,), -1, jnp.int32) if index_B is None else index_B
    return lora_context(lora, index_B, jnp.zeros((batch,), jnp.int32))


def insert(state: DecodeState, slots: Array, cache: Any, logits: Array, resp_start: Array, limit: Array,
           params: sampling.SamplingParams, copies: int = 1, lora_index: Array | None = None) -> DecodeState:  # fmt: skip
    """Put b prefilled items into `slots` [b * copies] (an index >= B is dropped: padding of the prefill bucket).
    Each item fills `copies` consecutive entries of `slots` (its beams). Only the rows the prefill made are
    written into each slot's cache (a longer cache keeps its other rows: they are past the slot's length).
    `lora_index` [b]: each item's LoRA (default none)."""
    C = logits.shape[1]
    B, N = state.tokens.shape
    n = slots.shape[0]

    def put(old, new):
        new = jnp.repeat(new, copies, axis=0) if copies > 1 else new
        at = (slots,) + tuple(slice(0, d) for d in new.shape[1:])
        return old.at[at].set(new.astype(old.dtype), mode="drop")

    limit = jnp.minimum(jnp.maximum(limit // C, 1) * C, N)
    return state._replace(
        cache=jax.tree.map(put, state.cache, cache),
        logits=put(state.logits, logits),
        tokens=state.tokens.at[slots].set(0, mode="drop"),
        count=state.count.at[slots].set(0, mode="drop"),
        steps=state.steps.at[slots].set(0, mode="drop"),
        active=state.active.at[slots].set(slots < B, mode="drop"),
        resp_start=put(state.resp_start, resp_start),
        limit=put(state.limit, limit),
        last_seen=state.last_seen.at[slots].set(-1, mode="drop"),
        params=jax.tree.map(put, state.params, params),
        mu=put(state.mu, sampling.init_mirostat_mu(params)),
        beam=state.beam.at[slots].set(1.0, mode="drop"),
        finite=state.finite.at[slots].set(True, mode="drop"),
        lora=put(state.lora, jnp.full(resp_start.shape, -1, jnp.int32) if lora_index is None else lora_index),
    )  # fmt: skip


def _length_axes(cfg: ModelConfig) -> Any:
    """Per leaf of the backbone's state: True where axis 1 is the cached length (logical name "length")."""
    axes = backbone.get(cfg.arch_type).state_axes(cfg)
    return jax.tree.map(lambda ax: len(ax) > 1 and ax[1] == "length", axes, is_leaf=_is_axes)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def decode(cfg: ModelConfig, params: dict, state: DecodeState, key: Array, n_steps: int,
           features: sampling.Features | None = None, attend_len: int | None = None,
           lora: LoraStack | None = None) -> tuple[DecodeState, Array]:  # fmt: skip
    """`n_steps` AR steps for every slot (a fixed-trip loop: no data-dependent exit inside the program; inactive
    slots do not change). `features` (static): the sampler steps compiled in (default: all, right for any
    settings). `attend_len` (static): the cache rows the steps may touch (every slot's prefix + tokens stays
    below it); the loop then works on that many rows of the cache, so attention reads no more, and writes them
    back once at the end. None: the whole cache. `lora`: the job's stacked LoRAs (each slot's is `state.lora`)."""
    model = VALLE(cfg)
    f = features if features is not None else sampling.Features()
    C = cfg.causal_size
    stop = cfg.stop_token
    B, N = state.tokens.shape
    W = state.params.beam_width
    unified = cfg.experimental.unified_position_ids
    col = jnp.arange(C, dtype=jnp.int32)[None, :]
    row = jnp.arange(B, dtype=jnp.int32)[:, None]

    full_cache = state.cache
    sliced = None
    if attend_len is not None:
        sliced = _length_axes(cfg)
        state = state._replace(cache=jax.tree.map(lambda x, s: x[:, :attend_len] if s else x, full_cache, sliced))

    def body(_, carry):
        s, key = carry
        key, sub = jax.random.split(key)
        out = sampling.sample_ar(s.logits, s.tokens, s.count, s.params, sub, mirostat_mu=s.mu, beam_scores=s.beam,
                                 stop_token=stop, features=f, last_seen=s.last_seen)  # fmt: skip
        new = out.tokens.astype(jnp.int32)  # [B, C]; -1 past num_tokens (mirostat)
        num = out.num_tokens if f.mirostat else jnp.full((B,), C, jnp.int32)
        taken = s.active[:, None] & (col < num[:, None])  # the tokens appended this step
        tokens = s.tokens.at[row, jnp.where(taken, s.count[:, None] + col, N)].set(new, mode="drop")
        count = s.count + jnp.where(s.active, num, 0)
        steps = s.steps + s.active.astype(jnp.int32)
        active = s.active & ~jnp.any(taken & (new == stop), axis=-1) & (steps * C < s.limit)
        if W > 1:  # an item's beams run while its row 0 does (row 0 is the item's result)
            active = jnp.repeat(active.reshape(-1, W)[:, 0], W)
        last_seen = jax.vmap(sampling.update_last_positions)(s.last_seen, new, s.count, jnp.where(s.active, num, 0))
        fed = taken & active[:, None]  # a slot that stopped feeds nothing: its state stays as it was
        x = model.apply({"params": params}, jnp.where(fed, new, 0), method=VALLE.embed_ar_tokens)
        t = s.count[:, None] + col
        pos = (s.resp_start[:, None] + t) if unified else t
        with _ar_lora(lora, s.lora, B):
            h, cache = model.apply({"params": params}, x, pos.astype(jnp.int32), fed, s.cache, step=True,
                                   method=VALLE.backbone)  # fmt: skip
        rows = _ar_logits(model, params, h)
        if f.mirostat:  # after a one-token step the last C rows are C - 1 earlier rows and the new one
            both = jnp.concatenate([s.logits, rows], axis=1)
            rows = jnp.take_along_axis(both, (num[:, None] + col)[..., None], axis=1)
        logits = jnp.where(active[:, None, None], rows, s.logits)
        finite = s.finite & ~(s.active & ~jnp.isfinite(s.logits).all(axis=(1, 2)))
        s = s._replace(cache=cache, logits=logits, tokens=tokens, count=count, steps=steps, active=active,
                       last_seen=last_seen, mu=jnp.where(s.active, out.mirostat_mu, s.mu),
                       beam=jnp.where(s.active, out.beam_scores, s.beam), finite=finite)  # fmt: skip
        return s, key

    state, key = jax.lax.fori_loop(0, n_steps, body, (state, key))
    if sliced is not None:
        state = state._replace(cache=jax.tree.map(
            lambda full, part, s: jax.lax.dynamic_update_slice(full, part, (0,) * full.ndim) if s else part,
            full_cache, state.cache, sliced))  # fmt: skip
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
    features: sampling.Features | None = None,
    chunk: int = 32,
) -> ARResult:
    """Level-0 tokens for every item of `batch` with the KV cache / recurrent state: max_steps // causal_size
    iterations at most; an item stops when the stop token is among its sampled tokens or at max_steps_B.
    Decoding runs in chunks of `chunk` fixed steps; the loop over chunks exits once every item stopped.
    With beam search (`sampling_params.beam_width` W) the batch holds W rows per item (row 0 is the result)."""
    C = cfg.causal_size
    B = batch.text.shape[0]
    n_iter = max(1, max_steps // C)
    n_chunks = -(-n_iter // max(1, min(chunk, n_iter)))
    chunk = -(-n_iter // n_chunks)  # equal chunks: at most n_chunks - 1 steps past n_iter
    cache_len = prefix_rows(cfg, batch.text.shape[1], batch.prom.shape[1]) + n_iter * C
    sp = sampling_params if sampling_params is not None else greedy_params(B)
    state = empty_state(cfg, B, n_iter * C, cache_len, sp)
    cache, logits, start = prefill(cfg, params, batch)
    limit = jnp.full((B,), n_iter * C, jnp.int32) if max_steps_B is None else jnp.asarray(max_steps_B, jnp.int32)
    state = insert(state, jnp.arange(B), cache, logits, start, limit, sp)

    def cond(carry):
        i, s, _ = carry
        return (i < n_chunks) & jnp.any(s.active)

    def body(carry):
        i, s, k = carry
        s, k = decode(cfg, params, s, k, chunk, features)
        return i + 1, s, k

    _, state, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), state, jax.random.key(0) if key is None else key))
    return stop_result(state.tokens, state.count, cfg.stop_token)


def ar_generate_full(cfg: ModelConfig, params: dict, batch: Batch, max_steps: int, *, key: Array | None = None,
                     sampling_params: sampling.SamplingParams | None = None) -> ARResult:  # fmt: skip
    """The reference's loop: every step recomputes the whole sequence (no cache). Same results, O(N^2) work.
    As the reference, an item that stopped keeps growing its sequence (its extra tokens are cut); a mirostat
    item appends one token per step."""
    model = VALLE(cfg)
    C = cfg.causal_size
    B = batch.text.shape[0]
    n_iter = max(1, max_steps // C)
    N = n_iter * C
    stop = cfg.stop_token
    sp = sampling_params if sampling_params is not None else greedy_params(B)
    col = jnp.arange(C, dtype=jnp.int32)[None, :]

    def cond(carry):
        i, _, _, _, active, _, _ = carry
        return (i < n_iter) & jnp.any(active)

    def body(carry):
        i, buf, length, count, active, mu, key = carry
        logits, lay = model.apply({"params": params}, _ar_batch(batch, buf, length), uniform_level=True)
        key, sub = jax.random.split(key)
        out = sampling.sample_ar(_rows(logits, lay.length - C, C), buf, length, sp, sub, mirostat_mu=mu, stop_token=stop)
        taken = col < out.num_tokens[:, None]
        buf = buf.at[jnp.arange(B)[:, None], jnp.where(taken, length[:, None] + col, N)].set(out.tokens, mode="drop")
        count = jnp.where(active, count + out.num_tokens, count)
        active = active & ~jnp.any(taken & (out.tokens == stop), axis=-1)
        return i + 1, buf, length + out.num_tokens, count, active, out.mirostat_mu, key

    zeros = jnp.zeros((B,), jnp.int32)
    init = (jnp.int32(0), jnp.zeros((B, N), jnp.int32), zeros, zeros, jnp.ones((B,), bool),
            sampling.init_mirostat_mu(sp), jax.random.key(0) if key is None else key)  # fmt: skip
    _, buf, _, count, _, _, _ = jax.lax.while_loop(cond, body, init)
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
    features: sampling.Features | None = None,
    with_finite: bool = False,
    lora: LoraStack | None = None,
    lora_index: Array | None = None,
) -> Array | tuple[Array, Array]:
    """Codes [B, R, Q]: column 0 is `level0_BR`, columns 1..max_levels from one pass per level (spec 6.3).
    Response lengths are `batch.resp_len`; rows past them are padding. Columns beyond max_levels stay 0.
    The NAR samplers get temperature / min_temperature / top_k / top_p only, as the reference.
    `with_finite`: also return finite [B], False where a logit of the item's rows was NaN/+inf at some level.
    `lora` / `lora_index` [B]: the job's stacked LoRAs and each item's (-1: none), at each item's level."""
    model = VALLE(cfg)
    Q = cfg.resp_levels
    top = Q - 1 if max_levels is None else min(max_levels, Q - 1)
    B, R = level0_BR.shape
    sp = sampling_params if sampling_params is not None else greedy_params(B)
    key = jax.random.key(0) if key is None else key
    codes = jnp.zeros((B, R, Q), jnp.int32).at[:, :, 0].set(level0_BR.astype(jnp.int32))
    in_item = jnp.arange(R)[None, :] < batch.resp_len[:, None]

    def body(level, carry):
        codes, key, finite = carry
        lvl = jnp.full((B,), level, jnp.int32)
        index = jnp.full((B,), -1, jnp.int32) if lora_index is None else lora_index
        with lora_context(lora, index, lvl):
            logits, lay = model.apply({"params": params}, batch._replace(resp=codes, level=lvl), uniform_level=True)
        rows = _rows(logits, lay.resp_start, R)
        key, sub = jax.random.split(key)
        tokens = sampling.sample_nar(rows, sp, sub, features)
        codes = jax.lax.dynamic_update_slice(codes, tokens[:, :, None].astype(jnp.int32), (0, 0, level))
        # NaN or +inf (-inf is how narrower split heads pad their columns)
        bad = jnp.any(jnp.isnan(rows) | (rows == jnp.inf), axis=-1) & in_item
        finite = finite & ~jnp.any(bad, axis=-1)
        return codes, key, finite

    codes, _, finite = jax.lax.fori_loop(1, top + 1, body, (codes, key, jnp.ones((B,), bool)))
    return (codes, finite) if with_finite else codes


# ---------------------------------------------------------------------------------------------------------
# devices: one mesh, the training rules; every slot-indexed leaf split over the batch axes


def single_device_mesh(device: Any = None) -> Mesh:
    """A (data, fsdp, tensor) mesh of one device (default: the first local one)."""
    return parallel.make_mesh(None, [device if device is not None else jax.local_devices()[0]])


def state_shardings(cfg: ModelConfig, state: DecodeState, mesh: Mesh, rules: Any) -> DecodeState:
    """NamedSharding of every DecodeState leaf: slots over the mesh axes of the logical `batch` axis; the
    backbone's state by its own logical axes (e.g. KV heads over `tensor`)."""
    batch = NamedSharding(mesh, parallel.batch_spec(mesh, rules))
    axes = backbone.get(cfg.arch_type).state_axes(cfg)
    cache = jax.tree.map(lambda ax, x: NamedSharding(mesh, parallel.spec_for(ax, x.shape, mesh, rules)), axes,
                         state.cache, is_leaf=_is_axes)  # fmt: skip
    rest = {name: jax.tree.map(lambda _: batch, getattr(state, name)) for name in DecodeState._fields if name != "cache"}
    return DecodeState(cache=cache, **rest)


def place_params(cfg: ModelConfig, params: Any, mesh: Mesh, rules: Any) -> Any:
    """Parameters on `mesh` by their logical axes (replicated on a data-parallel mesh)."""
    from valle_jax.models.valle import logical_axes

    return jax.device_put(params, parallel.param_shardings(params, logical_axes(cfg), mesh, rules))


def place_batch(batch: Any, mesh: Mesh, rules: Any) -> Any:
    """Host arrays (leading axis = items) onto `mesh`: split over the batch axes when they divide it."""
    div = parallel.batch_divisor(mesh, rules)
    spec = parallel.batch_spec(mesh, rules)
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec if np.shape(x)[0] % div == 0 else P())),
                        batch)  # fmt: skip


class Programs(NamedTuple):
    """The compiled prefill / insert / decode for one model, mesh and DecodeState layout. insert and decode
    donate the state: its buffers are updated in place, never copied."""

    prefill: Any
    insert: Any
    decode: Any
    state_sharding: DecodeState


_PROGRAMS: dict[Any, Programs] = {}


def programs(cfg: ModelConfig, state: DecodeState, mesh: Mesh, rules: Any) -> Programs:
    """The jitted programs of a scheduler (module-level cache: every scheduler of a job, and of the next job
    with the same shapes, reuses them and their compiled variants)."""
    sharding = state_shardings(cfg, state, mesh, rules)
    key = (cfg, mesh, rules, jax.tree.structure(sharding), tuple(jax.tree.leaves(sharding)),
           tuple(x.shape for x in jax.tree.leaves(state)))  # fmt: skip
    if key not in _PROGRAMS:
        replicated = NamedSharding(mesh, P())
        _PROGRAMS[key] = Programs(
            prefill=jax.jit(prefill, static_argnums=(0,)),
            insert=jax.jit(insert, static_argnums=(7,), donate_argnums=(0,), out_shardings=sharding),
            decode=jax.jit(decode, static_argnums=(0, 4, 5, 6), donate_argnums=(2,),
                           out_shardings=(sharding, replicated)),
            state_sharding=sharding,
        )  # fmt: skip
    return _PROGRAMS[key]


# ---------------------------------------------------------------------------------------------------------
# continuous batching


class ARScheduler:
    """Continuous batching of AR decoding for jobs: when a slot's item stops, the slot takes the next item.

    Host loop: `submit` items (numpy text ids, prompt codes, per-item sampler settings); `run` refills free
    slots (one prefill program per (bucket size, text bucket, prompt bucket)), decodes `chunk` steps, and
    yields finished items. Shapes are static: `slots`, `max_tokens`, the text/prompt bucket maxima.

    Devices: the slots are split over the `mesh` (default: one device) by the logical-axis `rules` (default:
    the training rules), so `slots` is rounded up to a multiple of the batch shards (and of `beam_width`: an
    item with beam search takes `beam_width` slots). Sampler steps are compiled for the settings of the items
    submitted (`sampling.features_of`). The decode attention reads the cache rows in use rounded up to
    `attend_block` rows (0: always the whole cache) when that is at most half the cache: a few compiled
    variants per job, less memory traffic while slots are short (the rows in use are copied out and back once
    per chunk, so peak memory grows by at most half the cache).
    """

    def __init__(self, cfg: ModelConfig, params: dict, *, slots: int, max_tokens: int, text_bucket: int,
                 prom_bucket: int, chunk: int = 16, seed: int = 0, continuous: bool = True, mesh: Mesh | None = None,
                 rules: Any = None, beam_width: int = 0, mirostat_shared: bool = True,
                 attend_block: int = ATTEND_BLOCK, lora: LoraStack | None = None):  # fmt: skip
        if beam_width > 1 and cfg.causal_size != 1:
            raise ValueError(f"beam search needs causal_size 1 (the reference's beam path), this model has "
                             f"{cfg.causal_size}")  # fmt: skip
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else single_device_mesh()
        self.rules = rules if rules is not None else parallel.axis_rules()
        self.width = max(1, beam_width)
        unit = math.lcm(parallel.batch_divisor(self.mesh, self.rules), self.width)
        self.slots = -(-max(slots, self.width) // unit) * unit
        self.chunk, self.continuous, self.attend_block = chunk, continuous, attend_block
        self.text_bucket, self.prom_bucket = text_bucket, prom_bucket
        self.template = greedy_params(1, beam_width=beam_width, mirostat_shared=mirostat_shared)
        self.cache_len = prefix_rows(cfg, text_bucket, prom_bucket) + max(max_tokens, cfg.causal_size) + cfg.causal_size
        state = empty_state(cfg, self.slots, max_tokens, self.cache_len, self.template)
        self.programs = programs(cfg, state, self.mesh, self.rules)
        self.state = jax.device_put(state, self.programs.state_sharding)
        self.params = place_params(cfg, params, self.mesh, self.rules)
        # the job's LoRAs, stacked (small: replicated); each slot's index lives in the decode state
        self.lora = None if lora is None else jax.device_put(lora, NamedSharding(self.mesh, P()))
        self.n_loras = 0 if lora is None else int(lora.scale.shape[0])
        self.key = jax.random.key(seed)
        self.features = sampling.NO_FEATURES
        self.owner: list[Any] = [None] * (self.slots // self.width)  # the item id held by each group of slots
        self.rows = np.zeros((self.slots,), np.int64)  # host bound of each slot's cache rows in use
        self.queue: list[tuple[Any, dict]] = []
        self.steps = 0

    def submit(self, item_id: Any, text: np.ndarray, prom: np.ndarray, max_tokens: int,
               params: sampling.SamplingParams | None = None, lora: int = -1) -> None:  # fmt: skip
        """Queue one item. `params` is a batch-of-1 SamplingParams (default greedy) with the scheduler's
        static options (beam_width, mirostat_shared). `lora`: the item's index in the scheduler's LoRA stack
        (-1: none)."""
        if not -1 <= lora < self.n_loras:
            raise ValueError(f"item {item_id}: LoRA index {lora}, the scheduler holds {self.n_loras} LoRA(s)")
        if len(text) > self.text_bucket or len(prom) > self.prom_bucket:
            raise ValueError(f"item {item_id}: text {len(text)} / prompt {len(prom)} exceed the buckets "
                             f"{self.text_bucket} / {self.prom_bucket}")  # fmt: skip
        params = params if params is not None else self.template
        if (params.beam_width, params.mirostat_shared) != (self.template.beam_width, self.template.mirostat_shared):
            raise ValueError(f"item {item_id}: beam_width/mirostat_shared {params.beam_width}/{params.mirostat_shared} "
                             f"differ from the scheduler's {self.template.beam_width}/{self.template.mirostat_shared}")
        self.features = self.features.union(sampling.features_of(params))
        self.queue.append((item_id, {"text": text, "prom": prom, "max_tokens": max_tokens, "params": params,
                                     "lora": int(lora)}))  # fmt: skip

    def _refill(self) -> None:
        free = [i for i, o in enumerate(self.owner) if o is None]
        if not free or not self.queue:
            return
        if not self.continuous and any(o is not None for o in self.owner):
            return  # static batching: wait until the whole batch is done
        take = [self.queue.pop(0) for _ in range(min(len(free), len(self.queue)))]
        n = min(1 << (len(take) - 1).bit_length(), len(self.owner))
        items = [{"text": t["text"], "prom": t["prom"], "resp": np.zeros((1, 1), np.int32)} for _, t in take]
        items += [items[0]] * (n - len(items))  # bucket padding: inserted at a dropped index
        batch = make_batch(items, pad_to={"text": self.text_bucket, "prom": self.prom_bucket})
        batch = batch._replace(text=batch.text[:, : self.text_bucket], prom=batch.prom[:, : self.prom_bucket])
        index = np.array([t["lora"] for _, t in take] + [-1] * (n - len(take)), np.int32)
        index = None if self.lora is None else place_batch(index, self.mesh, self.rules)
        cache, logits, start = self.programs.prefill(self.cfg, self.params, place_batch(batch, self.mesh, self.rules),
                                                     self.lora, index)  # fmt: skip
        W = self.width
        slots = np.full((n * W,), self.slots, np.int32)
        for j, g in enumerate(free[: len(take)]):
            slots[j * W : (j + 1) * W] = np.arange(g * W, (g + 1) * W)
        limit = np.array([t["max_tokens"] for _, t in take] + [1] * (n - len(take)), np.int32)
        sp = sampling.stack_params([t["params"] for _, t in take] + [take[0][1]["params"]] * (n - len(take)))
        self.state = self.programs.insert(self.state, jnp.asarray(slots), cache, logits, start, jnp.asarray(limit), sp, W,
                                          index)  # fmt: skip
        start = np.asarray(start)
        for j, ((item_id, _), g) in enumerate(zip(take, free)):
            self.owner[g] = item_id
            self.rows[g * W : (g + 1) * W] = start[j]

    def run(self):
        """Yield (item_id, raw tokens [n_raw], tokens before the stop [length], finite) as items finish;
        finite is False when the item's logits held NaN/inf."""
        stop = self.cfg.stop_token
        W = self.width
        count = np.zeros((self.slots,), np.int64)
        while self.queue or any(o is not None for o in self.owner):
            before = set(i for i, o in enumerate(self.owner) if o is not None)
            self._refill()
            for g, o in enumerate(self.owner):
                if o is not None and g not in before:
                    count[g * W : (g + 1) * W] = 0
            occupied = np.repeat(np.array([o is not None for o in self.owner]), W)
            attend = self._attend_len_of(occupied, count)
            self.state, self.key = self.programs.decode(self.cfg, self.params, self.state, self.key, self.chunk,
                                                        self.features, attend, self.lora)  # fmt: skip
            self.steps += self.chunk
            active, count = (np.array(a) for a in jax.device_get((self.state.active, self.state.count)))
            done = [g for g, o in enumerate(self.owner) if o is not None and not active[g * W]]
            if not done:
                continue
            tokens, finite = (np.asarray(a) for a in jax.device_get((self.state.tokens, self.state.finite)))
            for g in done:
                i = g * W
                raw = tokens[i, : count[i]]
                yield self.owner[g], raw, before_stop(raw, stop), bool(finite[i])
                self.owner[g] = None

    def _attend_len_of(self, occupied: np.ndarray, count: np.ndarray) -> int | None:
        """Cache rows the next chunk may touch (prefix + tokens of every occupied slot + the chunk's tokens)."""
        if not occupied.any():
            return None
        need = int((self.rows + count)[occupied].max()) + self.chunk * self.cfg.causal_size
        return attend_length(need, self.cache_len, self.attend_block)


def attend_length(need: int, cache_len: int, block: int = ATTEND_BLOCK) -> int | None:
    """The `attend_len` of a decode call whose slots touch at most `need` cache rows: `need` rounded up to
    `block` rows (a few compiled variants per job), or None (the whole cache) when that is over half of it,
    where the copy out and back would cost more than it saves (and memory grows by at most half the cache)."""
    if not block:
        return None
    rows = min(-(-need // block) * block, cache_len)
    return rows if 2 * rows <= cache_len else None
