"""Tests for valle_jax.sampling against hand-worked numbers and small plain-Python references.

The plain-Python helpers below are written from the spec text (section 6.4), loop by loop, and share
no code with the implementation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valle_jax import sampling as S

NEG = -np.inf


# ----------------------------------------------------------------------------- plain references


def py_repetition(row, prev, factor, decay):
    out = list(row)
    if factor == 1.0:
        return out
    seen = set()
    for d, tok in enumerate(reversed(prev), start=1):
        if tok in seen:
            continue
        seen.add(tok)
        out[tok] = out[tok] / (factor * d ** decay)
    return out


def py_dry_lengths(prev, allowed):
    """Each token's longest match length (the reference's loop, bounded at max(allowed, 50)), first-seen order."""
    lengths = {}  # dict keeps first-seen order
    for i, tok in enumerate(prev):
        L = 1
        while L < max(allowed, 50):
            if i - L < 0 or prev[i - L] != prev[len(prev) - 1 - L]:
                break
            L += 1
        lengths[tok] = max(L, lengths.get(tok, 0))
    return lengths


def py_dry(row, prev, mult, base, allowed):
    out = list(row)
    if mult <= 0:
        return out
    for tok, L in py_dry_lengths(prev, allowed).items():
        if L < allowed:
            break
        out[tok] -= mult * base ** (L - allowed)
    return out


def py_top_k(row, k):
    if k <= 0:
        return list(row)
    k = min(max(k, 1), len(row))
    kth = sorted(row, reverse=True)[k - 1]
    return [v if v >= kth else NEG for v in row]


def py_top_p(row, p):
    if p >= 1.0:
        return list(row)
    order = sorted(range(len(row)), key=lambda i: -row[i])  # stable
    m = max(row)
    z = sum(math.exp(v - m) for v in row)
    cum, remove = 0.0, []
    for i in order:
        cum += math.exp(row[i] - m) / z
        remove.append(cum > p)
    remove = [False] + remove[:-1]
    out = list(row)
    for r, i in zip(remove, order):
        if r:
            out[i] = NEG
    return out


def py_temperature(row, t, tmin):
    if tmin < 0:
        tmin = t
    if abs(t - tmin) >= 0.001:
        m = max(row)
        pmax = 1.0 / sum(math.exp(v - m) for v in row)
        t = t - (t - tmin) / (1 + math.exp(-10 * (pmax - 0.5)))
    return [v / t for v in row]


def close(a, b, **kw):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=kw.get("rtol", 1e-5), atol=kw.get("atol", 1e-5))


# ----------------------------------------------------------------------------- defaults


def test_defaults():
    p = S.ar_defaults(2)
    assert p.batch_size == 2 and p.beam_width == 0 and p.mirostat_shared
    close(p.temperature, [1.0, 1.0])
    close(p.min_temperature, [-1.0, -1.0])
    assert p.top_k.tolist() == [-100, -100] and p.dry_allowed_length.tolist() == [2, 2]
    close(p.mirostat_eta, [0.1, 0.1])
    close(p.dry_base, [1.75, 1.75])
    close(S.init_mirostat_mu(p), [0.2, 0.2])  # 2 * eta, not 2 * tau
    cli = S.nar_defaults(1, preset="cli")
    close(cli.temperature, [0.01])
    assert cli.top_k.tolist() == [0]
    inf = S.ar_defaults(1, preset="inference")
    close(inf.temperature, [0.95])
    close(inf.min_temperature, [0.95])
    mixed = S.ar_defaults(3, temperature=[0.0, 0.5, 1.0], top_k=[0, 1, 2])
    close(mixed.temperature, [0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        S.ar_defaults(2, temperature=[1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- single samplers


def test_repetition_penalty_hand():
    # history [1, 3, 1, 2] (+ padding), walked backwards: token 2 at d=1, token 1 at d=2, token 3 at
    # d=3, then token 1 again (d=4, already penalised -> skipped).
    row = [1.0, 4.0, 6.0, -12.0, 3.0, 5.0]
    hist = jnp.array([1, 3, 1, 2, 4, 4])
    out = S.repetition_penalty(jnp.array([row]), hist, 4, 2.0, 1.0)
    # factor 2, decay 1: divisors 2*1=2 (tok 2), 2*2=4 (tok 1), 2*3=6 (tok 3); token 4 is padding
    close(out, [[1.0, 1.0, 3.0, -2.0, 3.0, 5.0]])  # -12 / 6 = -2: not sign aware (it moves up)
    assert out[0, 3] > row[3]
    # decay 0: every present token divided by the factor once
    close(S.repetition_penalty(jnp.array(row), hist, 4, 2.0, 0.0), [1.0, 2.0, 3.0, -6.0, 3.0, 5.0])
    # factor 1 disables it even with a decay
    close(S.repetition_penalty(jnp.array(row), hist, 4, 1.0, 3.0), row)
    # against the loop reference on a random case
    rng = np.random.default_rng(0)
    r = rng.normal(size=20).tolist()
    prev = rng.integers(0, 20, size=15).tolist()
    padded = jnp.array(prev + [0] * 5)
    close(S.repetition_penalty(jnp.array(r), padded, 15, 1.3, 0.7), py_repetition(r, prev, 1.3, 0.7))


def test_length_penalty_hand():
    row = jnp.array([[1.0, 2.0, 3.0, 8.0]])
    # stop token 3, 3 tokens generated: 8 / (3 + 1) ** 0.5 = 4
    close(S.length_penalty(row, 3, 0.5, stop_token=3), [[1.0, 2.0, 3.0, 4.0]])
    close(S.length_penalty(row, 3, 0.0, stop_token=3), row)
    close(S.length_penalty(row, 1, -1.0, stop_token=3), [[1.0, 2.0, 3.0, 16.0]])


def test_top_k_hand():
    row = jnp.array([1.0, 3.0, 3.0, 2.0, 0.0])
    close(S.top_k_filter(row, 2), [NEG, 3.0, 3.0, NEG, NEG])  # ties with the k-th are kept
    close(S.top_k_filter(row, 3), [NEG, 3.0, 3.0, 2.0, NEG])
    close(S.top_k_filter(row, 0), row)
    close(S.top_k_filter(row, -100), row)
    close(S.top_k_filter(row, 100), row)  # clamped to V
    # per-row k under vmap
    rows = jnp.stack([row, row])
    out = jax.vmap(S.top_k_filter)(rows, jnp.array([1, 4]))
    close(out, [[NEG, 3.0, 3.0, NEG, NEG], [1.0, 3.0, 3.0, 2.0, NEG]])


def test_top_p_hand():
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    row = jnp.array(np.log(probs), jnp.float32)
    lp = np.log(probs)
    # sorted: 0.5, 0.3, 0.15, 0.05 -> cum 0.5, 0.8, 0.95, 1.0
    # p=0.6: over [F, T, T, T] -> shifted [F, F, T, T] -> keep 0.5 and 0.3
    close(S.top_p_filter(row, 0.6), [NEG, lp[1], NEG, lp[3]])
    # p=0.9: [F, F, T, T] -> [F, F, F, T]
    close(S.top_p_filter(row, 0.9), [lp[0], lp[1], NEG, lp[3]])
    # p=0.1: everything over -> the top token alone survives
    close(S.top_p_filter(row, 0.1), [NEG, lp[1], NEG, NEG])
    close(S.top_p_filter(row, 1.0), lp)
    # top-k then top-p: k=3 drops 0.05 and top-p sees 0.5/0.95, 0.8/0.95, 1 = 0.526, 0.842, 1;
    # p=0.82: [F, T, T] -> [F, F, T] -> keeps 2 (top-p alone would keep 3: 0.5, 0.8, 0.95)
    close(S.top_p_filter(row, 0.82), [lp[0], lp[1], NEG, lp[3]])
    close(S.top_k_top_p_filter(row, 3, 0.82), [NEG, lp[1], NEG, lp[3]])
    rng = np.random.default_rng(1)
    r = rng.normal(size=30).astype(np.float32).tolist()
    close(S.top_k_top_p_filter(jnp.array(r), 12, 0.7), py_top_p(py_top_k(r, 12), 0.7))


def test_temperature_hand():
    row = [2.0, 1.0, 0.0]
    close(S.apply_temperature(jnp.array(row), 0.5, -1.0), [4.0, 2.0, 0.0])
    close(S.apply_temperature(jnp.array(row), 0.5, 0.5), [4.0, 2.0, 0.0])
    # |1.0 - 0.9995| < 0.001 -> plain temperature
    close(S.apply_temperature(jnp.array(row), 1.0, 0.9995), row)
    # dynamic: p_max = 1/(1 + e^-1 + e^-2) = 0.66524; exp(-1.6524) = 0.19157;
    # T = 1 - 0.5 / 1.19157 = 0.58039
    pmax = 1.0 / (1.0 + math.exp(-1.0) + math.exp(-2.0))
    assert abs(pmax - 0.665241) < 1e-6
    t_dyn = 1.0 - 0.5 / (1.0 + math.exp(-10.0 * (pmax - 0.5)))
    assert abs(t_dyn - 0.58039) < 1e-4
    close(S.apply_temperature(jnp.array(row), 1.0, 0.5), [v / t_dyn for v in row])
    # per row, with -inf entries (as after top-k)
    rows = [[3.0, NEG, 1.0], [0.0, 0.0, 0.0]]
    out = S.apply_temperature(jnp.array(rows), 1.2, 0.3)
    close(out, [py_temperature(r, 1.2, 0.3) for r in rows])


def test_dry_hand():
    V = 6
    zero = jnp.zeros((1, V))
    # history [2, 1, 2, 1, 3]: match lengths per position 1, 1, 3, 1, 5 (the last token always
    # matches itself back to the start); per token 2 -> 3, 1 -> 1, 3 -> 5; first-seen order 2, 1, 3.
    hist = jnp.array([2, 1, 2, 1, 3, 0, 0])
    # allowed 2: token 2 gets 1 * 2^(3-2) = 2, token 1 (length 1) breaks -> token 3 NOT penalised
    close(S.dry_penalty(zero, hist, 5, 1.0, 2.0, 2), [[0, 0, -2.0, 0, 0, 0]])
    # allowed 1: nothing breaks: 2 -> 2^2, 1 -> 2^0, 3 -> 2^4
    close(S.dry_penalty(zero, hist, 5, 1.0, 2.0, 1), [[0, -1.0, -4.0, -16.0, 0, 0]])
    # multiplier 0 -> nothing
    close(S.dry_penalty(zero, hist, 5, 0.0, 2.0, 1), zero)
    # [5, 5, 5]: token 5 max length 3 -> 0.5 * 1.75^1
    close(S.dry_penalty(jnp.zeros(V), jnp.array([5, 5, 5, 0]), 3, 0.5, 1.75, 2),
          [0, 0, 0, 0, 0, -0.875])
    # first token short -> immediate break ([1, 2, 3, 1, 2]: token 1 has length 1)
    close(S.dry_penalty(zero, jnp.array([1, 2, 3, 1, 2]), 5, 1.0, 2.0, 2), zero)


def test_dry_cap_and_reference():
    V = 4
    hist = jnp.full((60,), 3)
    # the last token's length is capped at max(allowed, 50) = 50 -> 1.1^(50-2)
    close(S.dry_penalty(jnp.zeros(V), hist, 60, 1.0, 1.1, 2), [0, 0, 0, -(1.1 ** 48)], rtol=1e-4)
    # allowed 55 -> cap 55 -> 1.1^0
    close(S.dry_penalty(jnp.zeros(V), hist, 60, 1.0, 1.1, 55), [0, 0, 0, -1.0])
    # max_match >= cap is exact
    close(S.dry_penalty(jnp.zeros(V), hist, 60, 1.0, 1.1, 2, max_match=50), [0, 0, 0, -(1.1 ** 48)],
          rtol=1e-4)
    rng = np.random.default_rng(2)
    for trial in range(6):
        n = int(rng.integers(1, 40))
        prev = rng.integers(0, 3, size=n).tolist()
        row = rng.normal(size=5).tolist()
        allowed = int(rng.integers(1, 4))
        got = S.dry_penalty(jnp.array(row), jnp.array(prev + [4] * (40 - n)), n, 0.8, 1.3, allowed)
        close(got, py_dry(row, prev, 0.8, 1.3, allowed), rtol=1e-4)


def zipf_row(vocab=200, a=1.2, seed=0):
    base = -a * np.log(np.arange(1, vocab + 1, dtype=np.float64))
    perm = np.random.default_rng(seed).permutation(vocab)
    row = np.empty(vocab)
    row[perm] = base  # token perm[r] has rank r
    return row.astype(np.float32), perm


def test_mirostat_k_hand():
    # Zipf logits -1.2 ln(i+1): every ratio p_i/p_(i+1) = ((i+2)/(i+1))^1.2, so s = 1.2, eps = 0.2,
    # 1 - 1024^-0.2 = 0.75; mu=5: ((0.2 * 32) / 0.75)^(1/1.2) = 5.97 -> round 6 -> k = 7
    srt = jnp.array(-1.2 * np.log(np.arange(1, 201)), jnp.float32)
    assert int(S.mirostat_k(srt, 5.0)) == 7
    # mu = 0.2 (2 * eta at start): (0.2 * 2^0.2 / 0.75)^(1/1.2) = 0.373 -> 0 -> k = 1
    assert int(S.mirostat_k(srt, 0.2)) == 1
    # against the spec's float64 formula on a non-Zipf row
    rng = np.random.default_rng(3)
    lg = np.sort(rng.normal(size=300) * 2.0)[::-1]
    p = np.exp(lg - lg.max())
    p /= p.sum()
    num = sum(math.log(p[i] / p[i + 1]) * math.log((i + 2) / (i + 1)) for i in range(100))
    den = sum(math.log((i + 2) / (i + 1)) ** 2 for i in range(100))
    s = num / den
    for mu in (3.0, 6.0, 9.0):
        k = round(((s - 1) * 2 ** mu / (1 - 1024 ** (1 - s))) ** (1 / s)) + 1
        assert int(S.mirostat_k(jnp.array(lg, jnp.float32), mu)) == min(k, 300)


def test_mirostat_sample_support_and_update():
    row, perm = zipf_row()
    p = np.exp(row.astype(np.float64) - row.max())
    p /= p.sum()
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    toks, mus, _ = jax.vmap(lambda k: S.mirostat_sample(jnp.array(row), 5.0, 3.0, 0.1, k))(keys)
    toks = np.asarray(toks)
    assert set(toks.tolist()) <= set(perm[:7].tolist())  # k = 7: only the 7 best tokens
    assert len(set(toks.tolist())) > 1
    expect = 5.0 - 0.1 * (np.log2(1.0 / p[toks]) - 3.0)
    close(mus, expect, rtol=1e-5)


def test_mirostat_shared_vs_per_item():
    row0, perm0 = zipf_row(seed=0)
    row1, perm1 = zipf_row(seed=1)
    rows = jnp.array(np.stack([row0, row1]))
    p0 = np.exp(row0 - row0.max()); p0 /= p0.sum()
    p1 = np.exp(row1 - row1.max()); p1 /= p1.sum()
    s0 = -np.log2(p0[perm0[0]])
    s1 = -np.log2(p1[perm1[0]])
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    tau, eta = jnp.array([3.0, 3.0]), jnp.array([0.1, 0.1])
    mu0 = jnp.array([0.2, 0.2])  # k = 1 throughout: both items draw their argmax
    active = jnp.array([True, True])
    tok, mu = S.mirostat_batch(rows, mu0, tau, eta, keys, active, shared=True)
    # shared state: updated by item 0 then item 1; both get item 1's token (list aliasing)
    assert tok.tolist() == [perm1[0], perm1[0]]
    mu_expect = 0.2 - 0.1 * (s0 - 3.0) - 0.1 * (s1 - 3.0)
    close(mu, [mu_expect, mu_expect])
    tok, mu = S.mirostat_batch(rows, mu0, tau, eta, keys, active, shared=False)
    assert tok.tolist() == [perm0[0], perm1[0]]
    close(mu, [0.2 - 0.1 * (s0 - 3.0), 0.2 - 0.1 * (s1 - 3.0)])
    # inactive item 0 does not touch the shared state
    tok, mu = S.mirostat_batch(rows, mu0, tau, eta, keys, jnp.array([False, True]), shared=True)
    assert tok.tolist() == [-1, perm1[0]]
    close(mu, [0.2 - 0.1 * (s1 - 3.0)] * 2)


def test_beam_step_hand():
    logits = jnp.array([[0.1, 2.0, 0.3, 0.0],
                        [1.5, 0.2, 3.0, 0.0],
                        [0.0, 0.0, 0.0, 2.5]])
    scores = jnp.array([1.0, 1.0, 1.0])
    tok, sc, src = S.beam_search_step(logits, scores, 3)
    # global top-3: 3.0 (row 1, tok 2), 2.5 (row 2, tok 3), 2.0 (row 0, tok 1), in rank order
    assert tok.tolist() == [2, 3, 1] and src.tolist() == [1, 2, 0]
    close(sc, [4.0, 3.5, 3.0])
    # first step: row 0 only
    tok, sc, src = S.beam_search_step(logits, jnp.array([1.0, 2.0, 3.0]), 3, first_step=True)
    assert tok.tolist() == [1, 2, 0] and src.tolist() == [0, 0, 0]
    close(sc, [3.0, 2.3, 3.1])  # slot i: scores[i] + rank-i logit

    # through sample_ar: temperature 2 halves the logits before the beam picks
    p = S.ar_defaults(3, temperature=2.0, beam_width=3)
    hist = jnp.zeros((3, 4), jnp.int32)
    out = jax.jit(S.sample_ar)(logits[:, None, :], hist, jnp.array([2, 2, 2]), p,
                               jax.random.PRNGKey(0), beam_scores=scores)
    assert out.tokens[:, 0].tolist() == [2, 3, 1]
    close(out.beam_scores, [2.5, 2.25, 2.0])
    assert out.beam_source.tolist() == [1, 2, 0]
    # history_len 0 -> first step (only row 0)
    out = S.sample_ar(logits[:, None, :], hist, jnp.zeros(3, jnp.int32), p, jax.random.PRNGKey(0))
    assert out.tokens[:, 0].tolist() == [1, 2, 0]
    close(out.beam_scores, [2.0, 1.15, 1.05])


# ----------------------------------------------------------------------------- pipelines


def test_ar_pipeline_order_against_reference():
    rng = np.random.default_rng(4)
    V, N = 12, 9
    rows = rng.normal(size=(2, 2, V)).astype(np.float32) * 2
    prev = [[1, 4, 4, 7, 1, 4], [3, 3, 3, 2, 0, 11, 3, 2, 3]]
    lens = [len(x) for x in prev]
    hist = np.zeros((2, N), np.int32)
    for b, x in enumerate(prev):
        hist[b, :len(x)] = x
    settings = dict(temperature=[0.7, 1.3], min_temperature=[-1.0, 0.4], top_k=[8, 0],
                    top_p=[0.9, 0.8], repetition_penalty=[1.4, 0.8],
                    repetition_penalty_decay=[0.5, 0.0], length_penalty=[0.3, -0.2],
                    dry_multiplier=[0.9, 0.5], dry_base=[1.75, 2.0], dry_allowed_length=[2, 1])
    p = S.ar_defaults(2, **settings)
    got, is_greedy, _ = jax.jit(S.process_logits_ar, static_argnames=("stop_token",))(
        rows, hist, jnp.array(lens), p, stop_token=V - 1)
    assert not bool(is_greedy.any())
    for b in range(2):
        for c in range(2):
            r = rows[b, c].astype(np.float64).tolist()
            r = py_repetition(r, prev[b], settings["repetition_penalty"][b],
                              settings["repetition_penalty_decay"][b])
            r[V - 1] /= (lens[b] + 1) ** settings["length_penalty"][b]
            r = py_top_p(py_top_k(r, settings["top_k"][b]), settings["top_p"][b])
            r = py_temperature(r, settings["temperature"][b], settings["min_temperature"][b])
            r = py_dry(r, prev[b], settings["dry_multiplier"][b], settings["dry_base"][b],
                       settings["dry_allowed_length"][b])
            close(got[b, c], r, rtol=1e-4)


def test_top_p_runs_before_temperature():
    # probs 0.5/0.3/0.2: top_p 0.6 keeps two tokens on the raw logits; with T=0.25 first it would
    # keep one.  The kept set must not depend on temperature.
    row = jnp.log(jnp.array([[[0.5, 0.3, 0.2]]]))
    for t in (0.25, 4.0):
        p = S.ar_defaults(1, temperature=t, top_p=0.6)
        x, _, _ = S.process_logits_ar(row, jnp.zeros((1, 1), jnp.int32), jnp.zeros(1, jnp.int32), p)
        assert np.isfinite(np.asarray(x[0, 0])).tolist() == [True, True, False]


def test_greedy_short_circuit_per_item():
    # raw argmax = token 0; repetition penalty 100 on token 0 (in the history) would move it to 1
    logits = jnp.array([[[5.0, 4.0, 0.0, -1.0]], [[5.0, 4.0, 0.0, -1.0]]])
    hist = jnp.array([[0, 0], [0, 0]])
    hl = jnp.array([1, 1])
    p = S.ar_defaults(2, temperature=[0.0, 1.0], top_k=[0, 1], repetition_penalty=100.0,
                      length_penalty=5.0, dry_multiplier=10.0, mirostat_tau=[2.0, 0.0])
    f = jax.jit(S.sample_ar, static_argnames=("stop_token",))
    for seed in range(3):
        out = f(logits, hist, hl, p, jax.random.PRNGKey(seed), stop_token=3)
        # item 0 greedy on the raw logits, item 1 top-1 of the penalised logits (5/100 < 4)
        assert out.tokens[:, 0].tolist() == [0, 1]
    close(out.mirostat_mu, S.init_mirostat_mu(p))  # greedy item 0 leaves mirostat alone
    # NAR: per-item greedy vs sampled; repetition settings are ignored by the NAR
    nl = jnp.array([[[1.0, 3.0, 2.0], [4.0, 0.0, 1.0]], [[1.0, 3.0, 2.0], [4.0, 0.0, 1.0]]])
    pn = S.nar_defaults(2, temperature=[0.0, 5.0], top_k=[0, 1], repetition_penalty=100.0)
    assert jax.jit(S.sample_nar)(nl, pn, jax.random.PRNGKey(0)).tolist() == [[1, 0], [1, 0]]


def test_categorical_seeded_and_distribution():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = jnp.array(np.log(np.tile(probs, (1, 2000, 1))), jnp.float32)  # [1, 2000, V]
    p = S.nar_defaults(1)
    f = jax.jit(S.sample_nar)
    a = f(logits, p, jax.random.PRNGKey(7))
    b = f(logits, p, jax.random.PRNGKey(7))
    c = f(logits, p, jax.random.PRNGKey(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    freq = np.bincount(np.asarray(a).ravel(), minlength=4) / 2000
    assert np.all(np.abs(freq - probs) < 0.04)
    # AR: same key -> same tokens, and an item does not depend on the batch size (fold_in)
    lg = jax.random.normal(jax.random.PRNGKey(1), (3, 1, 50))
    pa = S.ar_defaults(3)
    h, hl = jnp.zeros((3, 4), jnp.int32), jnp.zeros(3, jnp.int32)
    t1 = S.sample_ar(lg, h, hl, pa, jax.random.PRNGKey(3)).tokens
    t2 = S.sample_ar(lg, h, hl, pa, jax.random.PRNGKey(3)).tokens
    t3 = S.sample_ar(lg, h, hl, pa, jax.random.PRNGKey(4)).tokens
    assert np.array_equal(t1, t2) and not np.array_equal(t1, t3)
    keys3, keys2 = S.item_keys(jax.random.PRNGKey(3), 3), S.item_keys(jax.random.PRNGKey(3), 2)
    assert np.array_equal(keys3[:2], keys2)  # item i's key does not depend on the batch size


def test_mirostat_through_sample_ar_causal():
    # causal_size 2: mirostat uses the last row only and yields one token (column 0)
    row0, perm0 = zipf_row(seed=0)
    logits = jnp.array(np.stack([np.stack([row0[::-1], row0])] * 2))  # [2, 2, V]
    p = S.ar_defaults(2, mirostat_tau=3.0, mirostat_eta=0.1)
    out = jax.jit(S.sample_ar)(logits, jnp.zeros((2, 3), jnp.int32), jnp.array([0, 0]), p,
                               jax.random.PRNGKey(0))
    assert out.num_tokens.tolist() == [1, 1]
    assert out.tokens.tolist() == [[perm0[0], -1], [perm0[0], -1]]
    assert float(out.mirostat_mu[0]) > 0.2 and float(out.mirostat_mu[0]) == float(out.mirostat_mu[1])


def test_inside_while_loop():
    V, N, B = 16, 8, 2
    table = jax.random.normal(jax.random.PRNGKey(0), (V, V)) * 3
    p = S.ar_defaults(2, temperature=[0.0, 0.9], min_temperature=[-1.0, 0.5], top_k=[0, 6],
                      top_p=[1.0, 0.95], repetition_penalty=1.2, repetition_penalty_decay=0.3,
                      dry_multiplier=0.5, mirostat_tau=[0.0, 0.0])

    @jax.jit
    def decode(key):
        def cond(c):
            return c[0] < N

        def body(c):
            i, hist, mu, key = c
            last = jnp.where(i > 0, hist[:, jnp.maximum(i - 1, 0)], 0)
            logits = table[last][:, None, :]
            key, sub = jax.random.split(key)
            out = S.sample_ar(logits, hist, jnp.full((B,), i), p, sub, mirostat_mu=mu)
            hist = jax.lax.dynamic_update_slice(hist, out.tokens, (0, i))
            return i + 1, hist, out.mirostat_mu, key

        init = (0, jnp.zeros((B, N), jnp.int32), S.init_mirostat_mu(p), key)
        return jax.lax.while_loop(cond, body, init)[1]

    a = decode(jax.random.PRNGKey(5))
    b = decode(jax.random.PRNGKey(5))
    assert a.shape == (B, N) and np.array_equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < V
    # item 0 is greedy on the raw logits: a deterministic chain
    t = np.asarray(table)
    prev = 0
    for i in range(N):
        assert int(a[0, i]) == int(np.argmax(t[prev]))
        prev = int(a[0, i])


# ----------------------------------------------------------------------------- job-scale forms (same results)


def py_dry_any(row, prev, mult, base, allowed):
    """py_dry for any token values: out-of-range tokens match and break like others, never penalised."""
    out = list(row)
    for tok, L in py_dry_lengths(prev, allowed).items():
        if L < allowed:
            break
        if 0 <= tok < len(row):
            out[tok] -= mult * base ** (L - allowed)
    return out


def test_dry_grouping_any_token_values_and_bounded_matches():
    rng = np.random.default_rng(11)
    for trial in range(6):
        n = int(rng.integers(5, 80))
        prev = rng.choice([-1, 0, 1, 2, 7, 9], size=n).tolist()
        row = rng.normal(size=6).tolist()
        allowed = int(rng.integers(1, 4))
        hist = jnp.array(prev + [3] * (90 - n))
        got = S.dry_penalty(jnp.array(row), hist, n, 0.7, 1.4, allowed)
        close(got, py_dry_any(row, prev, 0.7, 1.4, allowed), rtol=1e-4)
        # the bound a decode loop compiles (max(50, allowed), features_of) gives the same numbers
        close(S.dry_penalty(jnp.array(row), hist, n, 0.7, 1.4, allowed, max_match=50), got, rtol=1e-6)


def test_dry_bound_matters_only_past_the_cap():
    hist = jnp.full((80,), 1)  # one token repeated longer than the reference's cap of 50
    exact = S.dry_penalty(jnp.zeros(4), hist, 80, 1.0, 1.1, 2)
    close(exact, [0, -(1.1 ** 48), 0, 0], rtol=1e-4)
    close(S.dry_penalty(jnp.zeros(4), hist, 80, 1.0, 1.1, 2, max_match=50), exact, rtol=1e-6)
    # a bound below the cap shortens the matches (why features_of never picks one)
    close(S.dry_penalty(jnp.zeros(4), hist, 80, 1.0, 1.1, 2, max_match=10), [0, -(1.1 ** 8), 0, 0], rtol=1e-4)


def py_repetition_any(row, prev, factor, decay):
    """py_repetition for any token values: out-of-range tokens count in the distance, never penalised."""
    out, seen = list(row), set()
    for d, tok in enumerate(reversed(prev), start=1):
        if tok in seen:
            continue
        seen.add(tok)
        if 0 <= tok < len(row):
            out[tok] = out[tok] / (factor * d ** decay)
    return out


def test_last_positions_incremental_equals_history():
    rng = np.random.default_rng(12)
    V, C = 9, 3
    history: list[int] = []
    last = jnp.full((V,), -1, jnp.int32)
    for step in range(12):
        sampled = rng.integers(-2, V + 2, size=C)  # out-of-range ids are never penalised
        num = 1 if step % 3 == 1 else C  # mirostat steps append only their first token
        last = S.update_last_positions(last, jnp.array(sampled), len(history), num)
        history += sampled[:num].tolist()
        want = S.last_positions(jnp.array(history + [0] * 5), len(history), V)
        assert np.asarray(last).tolist() == np.asarray(want).tolist()
    row = rng.normal(size=V).astype(np.float32)
    close(S.repetition_penalty_from_last(jnp.array(row), last, len(history), 1.3, 0.5),
          py_repetition_any(row.tolist(), history, 1.3, 0.5), rtol=1e-5)


def test_one_sort_filter_equals_top_k_then_top_p():
    rng = np.random.default_rng(13)
    rows = np.round(rng.normal(size=(40, 30)), 1).astype(np.float32)  # rounded: many ties
    ks = rng.integers(-2, 35, size=40)
    ps = rng.choice([0.05, 0.3, 0.7, 0.95, 1.0], size=40)
    got = jax.vmap(S.top_k_top_p_filter)(jnp.array(rows), jnp.array(ks), jnp.array(ps, jnp.float32))
    two = jax.vmap(lambda r, k, p: S.top_p_filter(S.top_k_filter(r, k), p))(jnp.array(rows), jnp.array(ks),
                                                                            jnp.array(ps, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(two))
    for r, k, p, g in zip(rows, ks, ps, np.asarray(got)):
        close(g, py_top_p(py_top_k(r.tolist(), int(k)), float(p)))


def _random_settings(rng, B):
    return dict(temperature=rng.choice([0.0, 0.6, 1.0], B), min_temperature=rng.choice([-1.0, 0.3], B),
                top_k=rng.choice([0, 3, 20], B), top_p=rng.choice([1.0, 0.8], B),
                repetition_penalty=rng.choice([1.0, 1.3], B), repetition_penalty_decay=rng.choice([0.0, 0.5], B),
                length_penalty=rng.choice([0.0, 0.4], B), dry_multiplier=rng.choice([0.0, 0.8], B),
                dry_allowed_length=rng.choice([1, 2, 3], B), mirostat_tau=rng.choice([0.0, 0.0, 3.0], B))


def test_compiled_features_give_the_gated_tokens():
    """A decode loop compiles the steps its items use (features_of) and keeps last positions instead of
    rereading the history: the tokens, mirostat states and beam scores are those of the gated sampler."""
    rng = np.random.default_rng(14)
    B, C, V, N = 6, 2, 40, 24
    hist = rng.integers(0, V, size=(B, N)).astype(np.int32)
    lens = rng.integers(0, N, size=B)
    last = jax.vmap(lambda h, n: S.last_positions(h, n, V))(jnp.array(hist), jnp.array(lens))
    run = jax.jit(S.sample_ar, static_argnames=("features",))
    for trial, shared in enumerate((True, False)):
        settings = _random_settings(rng, B)
        p = S.ar_defaults(B, mirostat_shared=shared, **settings)
        f = S.features_of(p)
        assert f.sampled and f.dry and f.mirostat  # the settings use the steps worth checking
        logits = jnp.array(rng.normal(size=(B, C, V)) * 2, jnp.float32)
        key = jax.random.PRNGKey(trial)
        gated = run(logits, hist, lens, p, key)
        fixed = run(logits, hist, lens, p, key, features=f, last_seen=last)
        for a, b in zip(gated, fixed):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    # all greedy: argmax only
    g = S.ar_defaults(B, temperature=0.0, repetition_penalty=2.0, dry_multiplier=1.0)
    assert S.features_of(g) == S.NO_FEATURES
    logits = jnp.array(rng.normal(size=(B, C, V)), jnp.float32)
    out = S.sample_ar(logits, hist, lens, g, jax.random.PRNGKey(0), features=S.NO_FEATURES)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.argmax(np.asarray(logits), -1))
    # NAR
    pn = S.nar_defaults(B, **{k: v for k, v in _random_settings(rng, B).items() if k in S.NAR_SETTINGS})
    nl = jnp.array(rng.normal(size=(B, 5, V)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(S.sample_nar(nl, pn, jax.random.PRNGKey(1))),
                                  np.asarray(S.sample_nar(nl, pn, jax.random.PRNGKey(1), S.features_of(pn))))


def test_features_of_and_union():
    f = S.features_of(S.ar_defaults(3, temperature=[0.0, 1.0, 1.0], top_k=[5, 0, 0], dry_multiplier=[1.0, 0.0, 0.5],
                                    dry_allowed_length=[70, 2, 3], mirostat_tau=[2.0, 0.0, 0.0]))
    # greedy item 0 needs nothing: its top-k, DRY and mirostat do not count
    assert f == S.Features(sampled=True, repetition=False, length=False, top_k=False, top_p=False,
                           dynamic_temperature=False, dry=True, mirostat=False, dry_max_match=50)
    g = S.features_of(S.ar_defaults(1, temperature=1.0, min_temperature=0.5, dry_multiplier=1.0, dry_allowed_length=64))
    assert g.dynamic_temperature and g.dry_max_match == 64
    u = f.union(g)
    assert u.dry and u.dry_max_match == 64 and u.dynamic_temperature and not u.top_k


def test_beam_groups_are_independent_items():
    """Several items' beams in one batch (consecutive rows of beam_width): each group equals it alone."""
    rng = np.random.default_rng(15)
    W, G, V = 3, 2, 12
    logits = jnp.array(rng.normal(size=(G * W, 1, V)), jnp.float32)
    p = S.ar_defaults(G * W, temperature=[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], beam_width=W)
    scores = jnp.array(rng.normal(size=G * W), jnp.float32)
    lens = jnp.array([0, 0, 0, 4, 4, 4])  # group 0 on its first step, group 1 later
    hist = jnp.zeros((G * W, 5), jnp.int32)
    both = S.sample_ar(logits, hist, lens, p, jax.random.PRNGKey(0), beam_scores=scores)
    for g in range(G):
        rows = slice(g * W, (g + 1) * W)
        pg = jax.tree.map(lambda a: a[rows], p)
        alone = S.sample_ar(logits[rows], hist[rows], lens[rows], pg, jax.random.PRNGKey(0), beam_scores=scores[rows])
        np.testing.assert_array_equal(np.asarray(both.tokens[rows]), np.asarray(alone.tokens))
        close(both.beam_scores[rows], alone.beam_scores)
        np.testing.assert_array_equal(np.asarray(both.beam_source[rows]), np.asarray(alone.beam_source) + g * W)
    with pytest.raises(ValueError, match="multiple of beam_width"):
        S.sample_ar(logits[:4], hist[:4], lens[:4], jax.tree.map(lambda a: a[:4], p), jax.random.PRNGKey(0))
