"""Logit samplers of the reference VALL-E (mrq, commit 054d285), as pure JAX functions.

Everything here follows ``/work/shared/spec/reference-model.md`` section 6.4 (the pipeline of
``Base.sample``) and 6.5 (defaults).  All functions are pure and carry no ``jax.jit`` of their own: they
run inside the one compiled decode program of ``generate.py`` (and eagerly in tests).  They work with static
shapes, and take their settings as (possibly traced) arrays, so one batch may mix settings per item
(e.g. item 0 greedy, item 1 sampled) and the whole sampler can sit inside a ``lax.while_loop``.

AR pipeline (``sample_ar``), per batch item, in the reference order:

  1. ``min_temperature < 0`` -> ``min_temperature = temperature``.
  2. (the caller passes only the rows to sample: AR -> the last ``causal_size`` rows)
  3. logits are processed in float32 (the reference keeps bfloat16 logits in bfloat16; see notes)
  4./5. the stop-token "ban" of the reference is a no-op (bug); nothing is done here.
  6. ``temperature <= 0`` -> argmax of the raw logits; every later step is skipped for that item.
  7. repetition penalty (``factor != 1``): divides logits, each distinct previous token once, at its
     most recent occurrence d = 1, 2, ... from the end, by ``factor * d**decay`` (not sign aware).
  8. length penalty (``factor != 0``): stop-token logit divided by ``(len(history) + 1)**factor``.
  9. top-k (``k > 0``) then top-p (``p < 1``), both before temperature.
 10. temperature: dynamic when ``|T - T_min| >= 0.001`` (per row), else ``logits / T``.
 11. DRY (``multiplier > 0``) with the reference quirks.
 12. mirostat (``tau > 0``): last row only, state ``mu`` carried by the caller.
 13. beam search (static ``beam_width > 1``).
 14. otherwise categorical sampling of every row.

NAR pipeline (``sample_nar``): steps 1, 6, 9, 10, 14 only (the NAR loop of the reference passes only
temperature / min_temperature / top_k / top_p).

Cost per step in a job (same results as the plain forms): the optional steps are compiled in or out per
program from the items' settings (`Features`, no ``lax.cond`` per step); top-k and top-p share one sort;
the repetition penalty reads each token's last position [V] that the decode loop keeps (O(V), not
O(history)); DRY compares at most max(50, allowed_length) tokens back per position (its exact bound) and
groups tokens with one sort instead of an N x N table.

Deliberate choices where the reference is undefined, crashes or is not reproducible bit-for-bit:

* Arithmetic is float32 (the reference mixes float32 tensors with float64 Python scalars; results
  agree to float32 rounding).  The dynamic-temperature switch ``|T - T_min| >= 0.001`` is evaluated
  on the float32 parameters, so pairs within ~1e-7 of the threshold may switch differently.
* Sorting ties (top-p, mirostat) are broken by the lower token index (stable sort); ``torch.sort`` does
  not specify tie order.  Top-k keeps every logit equal to the k-th largest (as the reference).
* History tokens outside ``[0, V)`` are never penalised (the reference would index out of range or
  wrap around); they still take part in DRY's match-length computation and break rule.
* Mirostat: the reference estimates ``s`` from ``p_i / p_(i+1)`` of float32 probabilities and raises
  ``ZeroDivisionError`` when any of the first 101 sorted probabilities is 0 (e.g. after top-k < 101),
  or crashes on a complex ``k``.  Here ``ln(p_i/p_(i+1))`` is computed as the logit difference, terms
  with a filtered (-inf) logit are skipped, at most ``V - 1`` terms are used, and a non-finite ``k``
  means "no truncation" (k = V).  ``k`` is clipped to ``[1, V]``.
* Mirostat with ``causal_size > 1`` emits one token per step (column 0; other columns are -1 and
  ``num_tokens`` is 1), as the reference appends only the mirostat token.
* Greedy items never touch the mirostat state (the reference crashes when mirostat and greedy meet).
* Beam search: the reference only works for a batch of one prompt that it expands to ``beam_width``
  rows after the first step, with ``causal_size == 1``.  Here the caller keeps ``beam_width`` rows per item
  from the start (consecutive rows; several items may share a batch, each group on its own); on an item's
  first step (its row 0 has ``history_len == 0`` unless ``beam_first_step`` is given) only its row 0
  provides candidates.  Greedy rows (temperature <= 0, which crashes the reference's beam path) feed
  their raw logits to the beam selection.  Mirostat takes precedence over beam (as in the reference).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from valle_jax.config import STOP_TOKEN

__all__ = [
    "STOP_TOKEN",
    "MIROSTAT_N",
    "SETTINGS",
    "INT_SETTINGS",
    "NAR_SETTINGS",
    "SamplingParams",
    "make_params",
    "stack_params",
    "ar_defaults",
    "nar_defaults",
    "ARSample",
    "init_mirostat_mu",
    "init_beam_scores",
    "greedy",
    "repetition_penalty",
    "length_penalty",
    "top_k_filter",
    "top_p_filter",
    "top_k_top_p_filter",
    "last_positions",
    "update_last_positions",
    "repetition_penalty_from_last",
    "Features",
    "NO_FEATURES",
    "features_of",
    "dynamic_temperature",
    "apply_temperature",
    "dry_penalty",
    "mirostat_k",
    "mirostat_sample",
    "mirostat_batch",
    "beam_search_step",
    "categorical",
    "item_keys",
    "process_logits_ar",
    "process_logits_nar",
    "sample_ar",
    "sample_nar",
]

MIROSTAT_N = 1024  # "n" of the reference's mirostat state
MIROSTAT_TERMS = 100  # s is estimated from the first 100 ratios of sorted probabilities
DYNAMIC_TEMPERATURE_THRESHOLD = 1e-3
DYNAMIC_TEMPERATURE_K = 10.0
DYNAMIC_TEMPERATURE_CENTER = 0.5
DRY_MIN_CAP = 50  # match lengths grow while length < max(allowed_length, 50)

_NEG_INF = -jnp.inf
Scalar = Union[float, int, jax.Array]

# --------------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class SamplingParams:
    """Per-item sampling settings (each field an array of shape [B]) plus static options.

    ``beam_width`` and ``mirostat_shared`` are static (part of the tree structure, not traced).
    ``mirostat_shared=True`` reproduces the reference: one mirostat state shared by every batch item
    (list aliasing in ``AR_NAR.forward``).  It is updated by the mirostat items one after another in
    batch order, and every mirostat item gets the token drawn for the *last* mirostat item.
    ``mirostat_shared=False`` gives each item its own state and token.
    """

    temperature: jax.Array
    min_temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    repetition_penalty_decay: jax.Array
    length_penalty: jax.Array
    mirostat_tau: jax.Array
    mirostat_eta: jax.Array
    dry_multiplier: jax.Array
    dry_base: jax.Array
    dry_allowed_length: jax.Array
    beam_width: int = struct.field(pytree_node=False, default=0)
    mirostat_shared: bool = struct.field(pytree_node=False, default=True)

    @property
    def batch_size(self) -> int:
        return int(self.temperature.shape[0])


# The per-item settings (the traced fields of SamplingParams), which of them are integers, and the ones the NAR
# sampler reads (the reference's NAR loop passes only these).
SETTINGS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.metadata.get("pytree_node", True))
INT_SETTINGS = ("top_k", "dry_allowed_length")
NAR_SETTINGS = ("temperature", "min_temperature", "top_k", "top_p")


# Base.sample / AR_NAR.forward keyword defaults (AR_NAR.forward: mirostat eta 0.1).
_FORWARD_AR = dict(
    temperature=1.0,
    min_temperature=-1.0,
    top_k=-100,
    top_p=1.0,
    repetition_penalty=1.0,
    repetition_penalty_decay=0.0,
    length_penalty=0.0,
    mirostat_tau=0.0,
    mirostat_eta=0.1,
    dry_multiplier=0.0,
    dry_base=1.75,
    dry_allowed_length=2,
    beam_width=0,
)
_PRESETS_AR = {
    "forward": _FORWARD_AR,
    # python -m vall_e (vall_e/__main__.py argparse defaults)
    "cli": dict(_FORWARD_AR, top_k=0, mirostat_eta=0.0),
    # TTS.inference keyword defaults (vall_e/inference.py)
    "inference": dict(_FORWARD_AR, temperature=0.95, min_temperature=0.95, top_k=0),
}
_PRESETS_NAR = {
    "forward": dict(_FORWARD_AR),
    "cli": dict(_FORWARD_AR, temperature=0.01, top_k=0, mirostat_eta=0.0),
    "inference": dict(_FORWARD_AR, temperature=0.5, min_temperature=0.5, top_k=0),
}


def make_params(batch_size: int, *, beam_width: int = 0, mirostat_shared: bool = True, **settings) -> SamplingParams:
    """Build ``SamplingParams``; every setting is a scalar (broadcast) or a length-``batch_size`` list.
    Settings not given take the ``AR_NAR.forward`` defaults (``_FORWARD_AR``); an unknown name is refused."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"make_params: unknown sampler setting(s) {unknown}")
    values = {name: settings.get(name, _FORWARD_AR[name]) for name in SETTINGS}
    arrays = {}
    for name, v in values.items():
        dtype = jnp.int32 if name in INT_SETTINGS else jnp.float32
        a = jnp.asarray(v, dtype=dtype)
        if a.ndim > 1 or (a.ndim == 1 and a.shape[0] != batch_size):
            raise ValueError(f"{name}: expected a scalar or shape [{batch_size}], got {a.shape}")
        arrays[name] = jnp.broadcast_to(a, (batch_size,))
    return SamplingParams(**arrays, beam_width=int(beam_width), mirostat_shared=bool(mirostat_shared))


def stack_params(per_item: Sequence[SamplingParams]) -> SamplingParams:
    """One SamplingParams of the items' settings, in order (static options from the first)."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *per_item)


def _preset(table, preset, batch_size, overrides):
    if preset not in table:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(table)}")
    kw = dict(table[preset])
    kw.update(overrides)
    return make_params(batch_size, **kw)


def ar_defaults(batch_size: int, preset: str = "forward", **overrides) -> SamplingParams:
    """AR settings.  ``preset``:

    * ``"forward"`` (default): ``AR_NAR.forward`` keyword defaults (= ``Base.sample``'s, plus
      mirostat eta 0.1): T 1.0, T_min -1, top_k -100, top_p 1.0, repetition 1.0/0.0, length 0.0,
      beam 0, mirostat tau 0.0 / eta 0.1, DRY 0/1.75/2.
    * ``"cli"``: ``python -m vall_e`` defaults: as above but top_k 0, mirostat eta 0.
    * ``"inference"``: ``TTS.inference`` defaults: T 0.95, T_min 0.95, top_k 0, eta 0.1.
    """
    return _preset(_PRESETS_AR, preset, batch_size, overrides)


def nar_defaults(batch_size: int, preset: str = "forward", **overrides) -> SamplingParams:
    """NAR settings (only temperature, min_temperature, top_k, top_p are used by ``sample_nar``).

    ``"forward"`` (default): ``AR_NAR.forward``: T 1.0, T_min -1, top_k -100, top_p 1.0;
    ``"cli"``: T 0.01, T_min -1, top_k 0; ``"inference"``: T 0.5, T_min 0.5, top_k 0.
    """
    return _preset(_PRESETS_NAR, preset, batch_size, overrides)


def init_mirostat_mu(params: SamplingParams) -> jax.Array:
    """Initial mirostat state: mu = 2 * eta (the AR loop's value, not 2 * tau), shape [B]."""
    return 2.0 * params.mirostat_eta.astype(jnp.float32)


def init_beam_scores(beam_width: int) -> jax.Array:
    """Initial running beam scores (the AR loop starts every sequence at 1.0)."""
    return jnp.ones((beam_width,), jnp.float32)


# --------------------------------------------------------------------------------------------------
# single samplers; logits have shape [..., V] and every leading row gets the same treatment.
# Scalar settings may be traced; use jax.vmap for per-item settings.
# --------------------------------------------------------------------------------------------------


def greedy(logits: jax.Array) -> jax.Array:
    """Argmax per row (first index on ties, like torch)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _token_mask(history, length, vocab):
    """Index array for scatters: history tokens at positions < length and in [0, vocab), else vocab."""
    n = history.shape[-1]
    pos = jnp.arange(n)
    ok = (pos < length) & (history >= 0) & (history < vocab)
    return jnp.where(ok, history, vocab).astype(jnp.int32), pos


def last_positions(history, length, vocab: int):
    """[vocab] int32: the position of each token's most recent occurrence among the first ``length`` history
    tokens (-1 = absent). Tokens outside [0, vocab) are left out. A decode loop keeps this per slot and
    updates it with `update_last_positions`, so the repetition penalty never rereads the history."""
    idx, pos = _token_mask(history, length, vocab)
    return jnp.full((vocab,), -1, jnp.int32).at[idx].max(pos.astype(jnp.int32), mode="drop")


def update_last_positions(last, tokens, start, count):
    """`last` [V] after appending ``tokens[:count]`` at positions start, start + 1, ...; other tokens ignored."""
    vocab = last.shape[-1]
    tokens = jnp.asarray(tokens, jnp.int32)
    c = jnp.arange(tokens.shape[-1], dtype=jnp.int32)
    ok = (c < count) & (tokens >= 0) & (tokens < vocab)
    return last.at[jnp.where(ok, tokens, vocab)].max(start + c, mode="drop")


def repetition_penalty_from_last(logits, last, length, factor, decay):
    """`repetition_penalty` from the last-occurrence positions [V] (`last_positions`): O(V), any history."""
    logits = jnp.asarray(logits)
    present = last >= 0
    dist = jnp.maximum(length - last, 1).astype(jnp.float32)
    divisor = jnp.where(present, factor * jnp.power(dist, decay), 1.0).astype(logits.dtype)
    return jnp.where(factor != 1.0, logits / divisor, logits)


def repetition_penalty(logits, history, length, factor, decay):
    """Reference ``reptition_penalize`` (one_time=True) over a padded history.

    history: [N] ints, of which the first ``length`` are the previous tokens (oldest first).
    Each distinct token is divided once, at its most recent occurrence (distance d = length - pos),
    by ``factor * d**decay``, in every row.  No-op when ``factor == 1``.
    """
    logits = jnp.asarray(logits)
    last = last_positions(history, length, logits.shape[-1])
    return repetition_penalty_from_last(logits, last, length, factor, decay)


def length_penalty(logits, length, factor, stop_token: int = STOP_TOKEN):
    """Stop-token logit divided by ``(length + 1) ** factor`` (``length`` = tokens generated so far).

    No-op when ``factor == 0``.
    """
    logits = jnp.asarray(logits)
    vocab = logits.shape[-1]
    divisor = jnp.power(jnp.asarray(length + 1, jnp.float32), factor).astype(logits.dtype)
    col = jnp.arange(vocab) == stop_token
    return jnp.where((factor != 0.0) & col, logits / divisor, logits)


def _per_row(x, logits):
    return jnp.broadcast_to(jnp.asarray(x), logits.shape[:-1])[..., None]


def top_k_filter(logits, top_k):
    """Keep logits >= the k-th largest (k clamped to [1, V]); others -inf.  No-op when ``top_k <= 0``."""
    logits = jnp.asarray(logits)
    vocab = logits.shape[-1]
    k = _per_row(top_k, logits)
    kk = jnp.clip(k, 1, vocab).astype(jnp.int32)
    desc = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(desc, kk - 1, axis=-1)
    out = jnp.where(logits < kth, _NEG_INF, logits)
    return jnp.where(k > 0, out, logits)


def top_p_filter(logits, top_p):
    """Nucleus filter of the reference (no-op when ``top_p >= 1``).

    Sort descending, cumulative softmax; remove tokens whose cumulative probability exceeds top_p,
    shifted right by one (so the first token past the threshold is kept, and the top token always).
    """
    logits = jnp.asarray(logits)
    p = _per_row(top_p, logits)
    order = jnp.argsort(-logits, axis=-1, stable=True)
    srt = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    remove = cum > p
    remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)
    inverse = jnp.argsort(order, axis=-1)
    remove = jnp.take_along_axis(remove, inverse, axis=-1)
    return jnp.where(remove & (p < 1.0), _NEG_INF, logits)


def top_k_top_p_filter(logits, top_k, top_p):
    """Top-k, then top-p (each only where enabled), with one sort.

    The kept top-k logits are a prefix of the descending (stable) order and keep their order after
    filtering, so top-p runs on the same sorted row; the result goes back by scattering through the
    permutation (no second or inverse sort). Equal to ``top_p_filter(top_k_filter(x, k), p)``.
    """
    logits = jnp.asarray(logits)
    vocab = logits.shape[-1]
    k = _per_row(top_k, logits)
    p = _per_row(top_p, logits)
    order = jnp.argsort(-logits, axis=-1, stable=True)
    srt = jnp.take_along_axis(logits, order, axis=-1)
    kth = jnp.take_along_axis(srt, jnp.clip(k, 1, vocab).astype(jnp.int32) - 1, axis=-1)
    srt = jnp.where((k > 0) & (srt < kth), _NEG_INF, srt)
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    remove = cum > p
    remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)
    srt = jnp.where(remove & (p < 1.0), _NEG_INF, srt)
    flat_order = order.reshape(-1, vocab)
    rows = jnp.arange(flat_order.shape[0])[:, None]
    out = jnp.zeros_like(flat_order, dtype=logits.dtype).at[rows, flat_order].set(srt.reshape(-1, vocab))
    return out.reshape(logits.shape)


def dynamic_temperature(logits, temperature, min_temperature):
    """Per row: p_max = 1/sum(exp(l - max)); T = T - (T - T_min)/(1 + exp(-10 (p_max - 0.5)))."""
    logits = jnp.asarray(logits)
    t = _per_row(temperature, logits).astype(jnp.float32)
    tmin = _per_row(min_temperature, logits).astype(jnp.float32)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p_max = 1.0 / jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)
    sig = 1.0 + jnp.exp(-DYNAMIC_TEMPERATURE_K * (p_max - DYNAMIC_TEMPERATURE_CENTER))
    t_dyn = t - (t - tmin) / sig
    return logits / t_dyn.astype(logits.dtype)


def apply_temperature(logits, temperature, min_temperature=-1.0):
    """Step 10 (with step 1): dynamic temperature when |T - T_min| >= 0.001, else ``logits / T``.

    ``min_temperature < 0`` means ``min_temperature = temperature``.  ``temperature`` must be > 0
    (greedy is handled by the caller).
    """
    logits = jnp.asarray(logits)
    t = jnp.asarray(temperature, jnp.float32)
    tmin = jnp.asarray(min_temperature, jnp.float32)
    tmin = jnp.where(tmin < 0, t, tmin)
    dyn = jnp.abs(t - tmin) >= DYNAMIC_TEMPERATURE_THRESHOLD
    plain = logits / _per_row(t, logits).astype(logits.dtype)
    return jnp.where(_per_row(dyn, logits), dynamic_temperature(logits, t, tmin), plain)


def dry_penalty(logits, history, length, multiplier, base=1.75, allowed_length=2,
                max_match: Optional[int] = None):
    """Reference ``dry_sampling`` with its quirks, over a padded history [N] of which ``length`` are used.

    For each position i the match length starts at 1 and grows while it is < max(allowed, 50),
    ``i - length >= 0`` and ``prev[i - length] == prev[n - 1 - length]`` (the sequence ending at the
    second-to-last token).  Each token keeps its maximum length over its occurrences.  Going through
    tokens in first-seen order, stop at the first token with length < allowed (``break``); every
    token before it gets ``multiplier * base**(length - allowed)`` subtracted (all rows).
    No-op when ``multiplier <= 0``.

    ``max_match`` (static) caps the number of comparisons (lengths <= max_match) to save work; the
    result is exact whenever ``max_match >= max(allowed_length, 50)``.  ``None`` = exact always.
    Cost: O(N * min(N, max_match)) comparisons plus one sort of the history (tokens are grouped by a
    stable sort, so any token values work, in or out of [0, V)).
    """
    logits = jnp.asarray(logits)
    vocab = logits.shape[-1]
    hist = jnp.asarray(history).astype(jnp.int32)
    n_hist = hist.shape[-1]
    n = jnp.asarray(length, jnp.int32)
    allowed = jnp.asarray(allowed_length, jnp.int32)
    cap = jnp.maximum(allowed, DRY_MIN_CAP)
    kmax = n_hist - 1 if max_match is None else max(0, min(n_hist - 1, int(max_match) - 1))

    pos = jnp.arange(n_hist, dtype=jnp.int32)
    valid = pos < n
    if kmax > 0:
        i = pos[:, None]
        k = jnp.arange(1, kmax + 1, dtype=jnp.int32)[None, :]
        a_idx = i - k
        b_idx = n - 1 - k
        ok = (a_idx >= 0) & (b_idx >= 0) & (k < cap) & valid[:, None]
        a = hist[jnp.clip(a_idx, 0, n_hist - 1)]
        b = hist[jnp.clip(b_idx, 0, n_hist - 1)]
        match = (ok & (a == b)).astype(jnp.int32)
        run = jnp.sum(jnp.cumprod(match, axis=1), axis=1)
    else:
        run = jnp.zeros((n_hist,), jnp.int32)
    match_len = 1 + run  # [N]

    # group the valid positions by token: stable sort by (invalid, token); positions stay ascending in a group
    invalid, tok, at = jax.lax.sort(((~valid).astype(jnp.int32), hist, pos), num_keys=2, is_stable=True)
    start = jnp.concatenate([jnp.ones((1,), bool), (tok[1:] != tok[:-1]) | (invalid[1:] != invalid[:-1])])
    group = jnp.cumsum(start.astype(jnp.int32)) - 1
    token_len = jax.ops.segment_max(match_len[at], group, num_segments=n_hist, indices_are_sorted=True)[group]
    first = start & (invalid == 0)  # a token's first occurrence (its group's lowest position)
    stop_at = jnp.min(jnp.where(first & (token_len < allowed), at, n_hist))  # the `break`
    penalised = first & (at < stop_at)
    amount = multiplier * jnp.power(jnp.asarray(base, jnp.float32),
                                    (token_len - allowed).astype(jnp.float32))
    idx = jnp.where(penalised & (tok >= 0) & (tok < vocab), tok, vocab)
    delta = jnp.zeros((vocab,), jnp.float32).at[idx].add(jnp.where(penalised, amount, 0.0), mode="drop")
    out = logits - delta.astype(logits.dtype)
    return jnp.where(multiplier > 0.0, out, logits)


def mirostat_k(sorted_logits, mu, n: int = MIROSTAT_N):
    """Mirostat's k (already +1) from descending-sorted logits [V] and the current mu (max_surprise).

    s = sum ln(p_i/p_(i+1)) ln((i+2)/(i+1)) / sum ln((i+2)/(i+1))^2 over i < 100;
    k = round(((s-1) 2^mu / (1 - n^(1-s)))^(1/s)) + 1, clipped to [1, V] (non-finite -> V).
    """
    vocab = sorted_logits.shape[-1]
    m = min(MIROSTAT_TERMS, vocab - 1)
    if m <= 0:
        return jnp.asarray(1, jnp.int32)
    i = np.arange(m, dtype=np.float64)
    t = jnp.asarray(np.log((i + 2.0) / (i + 1.0)), jnp.float32)
    hi = sorted_logits[:m].astype(jnp.float32)
    lo = sorted_logits[1:m + 1].astype(jnp.float32)
    ok = jnp.isfinite(hi) & jnp.isfinite(lo)
    log_b = jnp.where(ok, hi - lo, 0.0)
    num = jnp.sum(jnp.where(ok, log_b * t, 0.0))
    den = jnp.sum(jnp.where(ok, t * t, 0.0))
    s = num / den
    eps = s - 1.0
    kf = jnp.power((eps * jnp.power(2.0, mu)) / (1.0 - jnp.power(float(n), -eps)), 1.0 / s)
    kr = jnp.round(kf) + 1.0  # round half to even, as Python's round
    kr = jnp.where(jnp.isfinite(kr), jnp.clip(kr, 1.0, float(vocab)), float(vocab))
    return kr.astype(jnp.int32)


def mirostat_sample(logits_row, mu, tau, eta, key, n: int = MIROSTAT_N):
    """One mirostat draw from a row [V]; returns (token, new_mu, surprise).

    Sample from softmax of the top-k sorted logits; surprise = log2(1/p) with p from the softmax
    over all sorted logits; new_mu = mu - eta * (surprise - tau).
    """
    row = jnp.asarray(logits_row, jnp.float32)
    vocab = row.shape[-1]
    order = jnp.argsort(-row, stable=True)
    srt = row[order]
    k = mirostat_k(srt, mu, n)
    masked = jnp.where(jnp.arange(vocab) < k, srt, _NEG_INF)
    choice = jax.random.categorical(key, masked)
    logp = jax.nn.log_softmax(srt)
    surprise = -logp[choice] / math.log(2.0)
    new_mu = mu - eta * (surprise - tau)
    return order[choice].astype(jnp.int32), new_mu, surprise


def mirostat_batch(rows, mu, tau, eta, keys, active, shared: bool = True, n: int = MIROSTAT_N):
    """Mirostat over a batch of rows [B, V] with state mu [B]; only ``active`` items take part.

    shared=True (reference): one state (read from ``mu[0]``, written to every entry), updated by the
    active items in batch order; every active item returns the last active item's token.
    shared=False: independent per-item states.  Inactive items return token -1 and keep their mu.
    """
    mu = jnp.asarray(mu, jnp.float32)
    if not shared:
        tok, new_mu, _ = jax.vmap(lambda r, m, t, e, k: mirostat_sample(r, m, t, e, k, n))(
            rows, mu, tau, eta, keys)
        return jnp.where(active, tok, -1), jnp.where(active, new_mu, mu)

    def body(carry, xs):
        m, last = carry
        r, t, e, k, act = xs
        tok, new_m, _ = mirostat_sample(r, m, t, e, k, n)
        return (jnp.where(act, new_m, m), jnp.where(act, tok, last)), None

    (m_final, tok_final), _ = jax.lax.scan(
        body, (mu[0], jnp.asarray(-1, jnp.int32)), (rows, tau, eta, keys, active))
    return jnp.where(active, tok_final, -1), jnp.full_like(mu, m_final)


def beam_search_step(logits, scores, beam_width: int, first_step=False):
    """The reference's naive beam step over rows [R, V] (tempered logits) and running scores [W].

    The global top-``beam_width`` (row, token) pairs are assigned to sequence slots in rank order
    regardless of their source row; slot i's score becomes ``scores[i] + logit``.  On the first step
    only row 0 provides candidates (the reference expands a batch of 1).  Returns
    (tokens [W], new_scores [W], source_rows [W]).
    """
    logits = jnp.asarray(logits, jnp.float32)
    rows, vocab = logits.shape
    x = jnp.where(jnp.asarray(first_step) & (jnp.arange(rows)[:, None] > 0), _NEG_INF, logits)
    vals, flat = jax.lax.top_k(x.reshape(-1), beam_width)
    return (flat % vocab).astype(jnp.int32), scores + vals, (flat // vocab).astype(jnp.int32)


def categorical(key, logits):
    """Sample each row of logits [..., V] (one key covers all rows)."""
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def item_keys(key, batch_size: int):
    """Per-item keys: ``fold_in(key, i)``; item i's randomness does not depend on the batch size."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


# --------------------------------------------------------------------------------------------------
# batched pipelines
# --------------------------------------------------------------------------------------------------


class Features(NamedTuple):
    """Which sampler steps a compiled program holds (static: part of a jit's static arguments).

    Without features (``None``) each optional step sits behind a ``lax.cond`` on the batch's settings, which
    suits eager use and tests; on a GPU every such gate reads its predicate back to the host once per step.
    A decode loop instead compiles one variant for the settings of the items it may hold (`features_of`):
    steps no item uses are left out, the others run for every item and are no-ops where an item disables
    them, so the tokens are the same either way.
    """

    sampled: bool = True  # some item has temperature > 0 (False: argmax only)
    repetition: bool = True
    length: bool = True
    top_k: bool = True
    top_p: bool = True
    dynamic_temperature: bool = True
    dry: bool = True
    mirostat: bool = True
    dry_max_match: Optional[int] = None  # static bound of DRY's match lengths (None: the history length)

    def union(self, other: "Features") -> "Features":
        """The features of a program that must serve the items of both."""
        flags = [a or b for a, b in zip(self[:-1], other[:-1])]
        caps = [m for m, on in ((self.dry_max_match, self.dry), (other.dry_max_match, other.dry)) if on]
        cap = None if not caps or None in caps else max(caps)
        return Features(*flags, dry_max_match=cap)


NO_FEATURES = Features(False, False, False, False, False, False, False, False, None)


def features_of(params: SamplingParams) -> Features:
    """The smallest `Features` that sample ``params`` exactly (reads the settings on the host). Greedy items
    (temperature <= 0) use no step. DRY's match lengths are bounded by max(50, the largest allowed length),
    which is exact (`dry_penalty`)."""
    g = {name: np.asarray(getattr(params, name)) for name in SETTINGS}
    t = g["temperature"].astype(np.float32)
    tmin = g["min_temperature"].astype(np.float32)
    tmin = np.where(tmin < 0, t, tmin)
    on = t > 0.0
    dry = on & (g["dry_multiplier"] > 0.0)
    return Features(
        sampled=bool(on.any()),
        repetition=bool((on & (g["repetition_penalty"] != 1.0)).any()),
        length=bool((on & (g["length_penalty"] != 0.0)).any()),
        top_k=bool((on & (g["top_k"] > 0)).any()),
        top_p=bool((on & (g["top_p"] < 1.0)).any()),
        dynamic_temperature=bool((on & (np.abs(t - tmin) >= np.float32(DYNAMIC_TEMPERATURE_THRESHOLD))).any()),
        dry=bool(dry.any()),
        mirostat=bool((on & (g["mirostat_tau"] > 0.0)).any()),
        dry_max_match=int(max(DRY_MIN_CAP, g["dry_allowed_length"][dry].max())) if dry.any() else None,
    )


def _gate(pred, fn, x, *args):
    """Run fn(x, *args) only when pred (a batch-level bool) holds; fn must leave disabled items as-is."""
    return jax.lax.cond(pred, lambda: fn(x, *args), lambda: x)


def _step(features, flag: str, pred, fn, x, *args):
    """A sampler step: behind a `_gate` without features, else compiled in (or out) by the static flag."""
    if features is None:
        return _gate(pred, fn, x, *args)
    return fn(x, *args) if getattr(features, flag) else x


def _temperatures(params):
    t = params.temperature.astype(jnp.float32)
    tmin = params.min_temperature.astype(jnp.float32)
    tmin = jnp.where(tmin < 0, t, tmin)  # step 1
    is_greedy = t <= 0.0
    # greedy items are overridden later; keep their arithmetic finite
    return jnp.where(is_greedy, 1.0, t), jnp.where(is_greedy, 1.0, tmin), is_greedy


def _filter_and_temper(x, params, features=None):
    p = params
    if features is None:
        x = _gate(jnp.any(p.top_k > 0) | jnp.any(p.top_p < 1.0), jax.vmap(top_k_top_p_filter), x, p.top_k, p.top_p)
    elif features.top_k or features.top_p:
        x = jax.vmap(top_k_top_p_filter)(x, p.top_k, p.top_p)
    t, tmin, is_greedy = _temperatures(p)
    if features is None or features.dynamic_temperature:
        x = jax.vmap(apply_temperature)(x, t, tmin)
    else:  # no item has a dynamic temperature: plain division, as apply_temperature does for them
        x = x / t.astype(x.dtype)[:, None, None]
    return x, is_greedy


def process_logits_ar(logits, history, history_len, params: SamplingParams, *,
                      stop_token: int = STOP_TOKEN, dry_max_match: Optional[int] = None,
                      features: Optional[Features] = None, last_seen=None):
    """Steps 1-11 on AR logits [B, C, V]; returns (processed [B, C, V], is_greedy [B], argmax [B, C]).

    Greedy items' processed rows are meaningless (they are replaced by the argmax).
    ``last_seen`` [B, V] (`last_positions` of each item's history, kept by a decode loop) makes the
    repetition penalty O(V) instead of reading the history. ``features``: see `Features`.
    """
    x0 = jnp.asarray(logits).astype(jnp.float32)
    history = jnp.asarray(history)
    history_len = jnp.asarray(history_len, jnp.int32)
    p = params
    f = features
    argmax = greedy(x0)
    if f is not None and not f.sampled:
        return x0, p.temperature <= 0.0, argmax
    if last_seen is not None:
        x = _step(f, "repetition", jnp.any(p.repetition_penalty != 1.0), jax.vmap(repetition_penalty_from_last), x0,
                  jnp.asarray(last_seen, jnp.int32), history_len, p.repetition_penalty, p.repetition_penalty_decay)
    else:
        x = _step(f, "repetition", jnp.any(p.repetition_penalty != 1.0), jax.vmap(repetition_penalty), x0,
                  history, history_len, p.repetition_penalty, p.repetition_penalty_decay)
    x = _step(f, "length", jnp.any(p.length_penalty != 0.0),
              jax.vmap(lambda l, n, fac: length_penalty(l, n, fac, stop_token)),
              x, history_len, p.length_penalty)
    x, is_greedy = _filter_and_temper(x, p, f)
    cap = dry_max_match if dry_max_match is not None else (f.dry_max_match if f is not None else None)
    x = _step(f, "dry", jnp.any(p.dry_multiplier > 0.0),
              jax.vmap(lambda l, h, n, m, b, a: dry_penalty(l, h, n, m, b, a, cap)),
              x, history, history_len, p.dry_multiplier, p.dry_base, p.dry_allowed_length)
    return x, is_greedy, argmax


def process_logits_nar(logits, params: SamplingParams, features: Optional[Features] = None):
    """Steps 1, 9, 10 on NAR logits [B, T, V]; returns (processed, is_greedy [B], argmax [B, T])."""
    x0 = jnp.asarray(logits).astype(jnp.float32)
    argmax = greedy(x0)
    if features is not None and not features.sampled:
        return x0, params.temperature <= 0.0, argmax
    x, is_greedy = _filter_and_temper(x0, params, features)
    return x, is_greedy, argmax


class ARSample(NamedTuple):
    tokens: jax.Array  # [B, C] int32 ([B] when logits were [B, V]); -1 = no token (see num_tokens)
    num_tokens: jax.Array  # [B] tokens produced this step: C, or 1 for mirostat items
    mirostat_mu: jax.Array  # [B] new mirostat state (replicated when shared)
    beam_scores: jax.Array  # [B] running beam scores (unchanged when beam is off)
    beam_source: jax.Array  # [B] source row of each beam slot's token (arange when beam is off)


def _beam_groups(rows, scores, history_len, beam_width: int, beam_first_step):
    """The beam step of each group of ``beam_width`` consecutive rows (an item's beams); rows [B, V]."""
    bsz, vocab = rows.shape
    groups = bsz // beam_width
    if beam_first_step is None:
        first = history_len.reshape(groups, beam_width)[:, 0] == 0
    else:
        first = jnp.broadcast_to(jnp.asarray(beam_first_step), (groups,))
    tok, new_scores, src = jax.vmap(lambda r, s, f: beam_search_step(r, s, beam_width, f))(
        rows.reshape(groups, beam_width, vocab), scores.reshape(groups, beam_width), first)
    src = src + (jnp.arange(groups, dtype=jnp.int32) * beam_width)[:, None]
    return tok.reshape(bsz), new_scores.reshape(bsz), src.reshape(bsz)


def sample_ar(logits, history, history_len, params: SamplingParams, key, *,
              mirostat_mu=None, beam_scores=None, beam_first_step=None,
              stop_token: int = STOP_TOKEN, dry_max_match: Optional[int] = None,
              mirostat_n: int = MIROSTAT_N, features: Optional[Features] = None,
              last_seen=None) -> ARSample:
    """Full AR sampler (spec 6.4, steps 1-14) for one decode step.

    logits: [B, C, V] (the last ``causal_size`` rows per item) or [B, V].
    history: [B, N] previously generated tokens (oldest first), ``history_len`` [B] of them valid.
    key: one PRNG key; item i uses ``fold_in(key, i)``.
    mirostat_mu: [B] state (default: ``init_mirostat_mu(params)``); carry ``result.mirostat_mu``.
    beam_scores: [B] running scores when ``params.beam_width > 1`` (default ``init_beam_scores``);
    beam mode needs C == 1 and B a multiple of beam_width: each run of beam_width consecutive rows is one
    item's beams (the reference's beam search of a batch of one, per item).
    features / last_seen: see `Features` and `process_logits_ar` (same tokens, less work).
    """
    logits = jnp.asarray(logits)
    squeeze = logits.ndim == 2
    if squeeze:
        logits = logits[:, None, :]
    bsz, crows, vocab = logits.shape
    p = params
    f = features
    history_len = jnp.asarray(history_len, jnp.int32)

    x, is_greedy, argmax = process_logits_ar(logits, history, history_len, p, stop_token=stop_token,
                                             dry_max_match=dry_max_match, features=f, last_seen=last_seen)
    keys = item_keys(key, bsz)
    cat_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    miro_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)

    mu = init_mirostat_mu(p) if mirostat_mu is None else jnp.asarray(mirostat_mu, jnp.float32)
    scores = (init_beam_scores(bsz) if beam_scores is None
              else jnp.asarray(beam_scores, jnp.float32))
    source = jnp.arange(bsz, dtype=jnp.int32)
    num = jnp.full((bsz,), crows, jnp.int32)

    if p.beam_width > 1:
        if bsz % p.beam_width or crows != 1:
            raise ValueError(f"beam search needs logits [a multiple of beam_width={p.beam_width}, 1, V], "
                             f"got {logits.shape}")
        rows = jnp.where(is_greedy[:, None], logits[:, 0, :].astype(jnp.float32), x[:, 0, :])
        btok, new_scores, bsrc = _beam_groups(rows, scores, history_len, p.beam_width, beam_first_step)
        tokens = btok[:, None]
    else:
        if f is None or f.sampled:
            tokens = jax.vmap(categorical)(cat_keys, x)
        else:
            tokens = argmax
        new_scores, bsrc = scores, source

    miro_active = (p.mirostat_tau > 0.0) & ~is_greedy

    def run_mirostat(_):
        tok, new_mu = mirostat_batch(x[:, -1, :], mu, p.mirostat_tau, p.mirostat_eta, miro_keys,
                                     miro_active, shared=p.mirostat_shared, n=mirostat_n)
        return tok, new_mu

    if f is None or f.mirostat:
        if f is None:
            miro_tok, new_mu = jax.lax.cond(jnp.any(miro_active), run_mirostat,
                                            lambda _: (jnp.full((bsz,), -1, jnp.int32), mu), None)
        else:
            miro_tok, new_mu = run_mirostat(None)
        miro_cols = jnp.concatenate(
            [miro_tok[:, None], jnp.full((bsz, crows - 1), -1, jnp.int32)], axis=1)
        tokens = jnp.where(miro_active[:, None], miro_cols, tokens)
        num = jnp.where(miro_active, 1, num)
        new_scores = jnp.where(miro_active, scores, new_scores)
        bsrc = jnp.where(miro_active, source, bsrc)
    else:
        new_mu = mu

    if p.beam_width <= 1:
        tokens = jnp.where(is_greedy[:, None], argmax, tokens)
    tokens = tokens.astype(jnp.int32)
    if squeeze:
        tokens = tokens[:, 0]
    return ARSample(tokens, num, new_mu, new_scores, bsrc)


def sample_nar(logits, params: SamplingParams, key, features: Optional[Features] = None) -> jax.Array:
    """NAR sampler: logits [B, T, V] -> tokens [B, T] (temperature/min_temperature/top_k/top_p only)."""
    logits = jnp.asarray(logits)
    x, is_greedy, argmax = process_logits_nar(logits, params, features)
    if features is not None and not features.sampled:
        return argmax
    keys = item_keys(key, logits.shape[0])
    tokens = jax.vmap(categorical)(keys, x)
    return jnp.where(is_greedy[:, None], argmax, tokens).astype(jnp.int32)
