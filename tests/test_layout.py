"""Sequence assembly and position ids against spec reference-model.md 2.2, 2.3, 2.5 (worked example), 2.6.

The expected rows / positions are written out from the spec's worked example table (version 5, T = 5 text
ids, P = 3 prompt frames) and the spec's embedding rules; the expected vectors are gathered directly from
the parameter tables with numpy, never through the code under test.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valle_jax.config import Experimental, ModelConfig
from valle_jax.layout import batch_rows, make_batch
from valle_jax.models.valle import VALLE, init_params

LEVELS = 4  # resp_levels of the small test models (tables P_0..P_3, R_0..R_3)
TEXT = np.array([1, 17, 42, 99, 2])  # T = 5 incl. BOS/EOS
rng = np.random.default_rng(1234)
PROM = rng.integers(0, 1024, size=(3, LEVELS))  # P = 3 frames, all levels
RESP = rng.integers(0, 1024, size=(4, LEVELS))  # T_r = 4 frames


def cfg_v5(sums: bool = False, unified: bool = False) -> ModelConfig:
    return ModelConfig(
        version=5, dim=16, heads=2, layers=1, resp_levels=LEVELS, dropout=0.0,
        experimental=Experimental(audio_embedding_sums=sums, unified_position_ids=unified),
    )  # fmt: skip


def cfg_v2(unified: bool = False) -> ModelConfig:
    return ModelConfig(
        version=2, arch_type="llama", dim=16, heads=2, layers=1, resp_levels=LEVELS, dropout=0.0,
        experimental=Experimental(audio_embedding_sums=True, unified_position_ids=unified),  # sums: no effect in v2
    )  # fmt: skip


@pytest.fixture(scope="module")
def params_v5():
    return jax.tree_util.tree_map(np.asarray, init_params(cfg_v5(), jax.random.key(0)))


@pytest.fixture(scope="module")
def params_v2():
    return jax.tree_util.tree_map(np.asarray, init_params(cfg_v2(), jax.random.key(1)))


def embed(cfg: ModelConfig, params, batch):
    x, lay = jax.jit(lambda p, b: VALLE(cfg).apply({"params": p}, b, method=VALLE.embed))(params, batch)
    return np.asarray(x), jax.tree_util.tree_map(np.asarray, lay)


# independent gathers from the parameter tables
def E_text(p, ids):
    return p["text_emb"]["embedding"][np.asarray(ids)]


def P(p, k, codes):
    return p["proms_emb"][f"embeddings_{k}"]["embedding"][np.asarray(codes)]


def R(p, k, codes):
    return p["resps_emb"][f"embeddings_{k}"]["embedding"][np.asarray(codes)]


def RVQ(p, level):
    return p["rvq_l_emb"]["embedding"][level]


def SEP(p):
    return p["sep"]


# --------------------------------------------------------------------------------------------------
# version 5 worked example (spec 2.5 table)
# --------------------------------------------------------------------------------------------------

AR_T2 = {"text": TEXT, "prom": PROM, "resp": RESP[:2, :1], "level": 0}  # AR step, t = 2
NAR_L3 = {"text": TEXT, "prom": PROM, "resp": RESP[:, :3], "level": 3}  # NAR level 3, levels 0..2 as input
AR_T0 = {"text": TEXT, "prom": PROM, "resp": np.zeros((0, 1), np.int64), "level": 0}  # first AR step
NOPROM_AR = {"text": TEXT, "prom": np.zeros((0, LEVELS), np.int64), "resp": RESP[:2, :1], "level": 0}
NOPROM_NAR1 = {"text": TEXT, "prom": np.zeros((0, LEVELS), np.int64), "resp": RESP[:, :1], "level": 1}
NAR_L1 = {"text": TEXT, "prom": PROM, "resp": RESP[:, :1], "level": 1}
NAR_L2 = {"text": TEXT, "prom": PROM, "resp": RESP[:, :2], "level": 2}
ITEMS = [AR_T2, NAR_L3, AR_T0, NOPROM_AR, NOPROM_NAR1, NAR_L1, NAR_L2]

# spec 2.5, "non-unified position ids" column, padding rows -> 1
POS_AR_T2 = [0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 3, 0, 1]
POS_NAR_L3 = [0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3]
POS_AR_T0 = [0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 3]
POS_NOPROM_AR = [0, 1, 2, 3, 4, 5, 0, 1, 0, 1]
POS_NOPROM_NAR = [0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 3]
EXPECTED_POS = [POS_AR_T2, POS_NAR_L3, POS_AR_T0, POS_NOPROM_AR, POS_NOPROM_NAR, POS_NAR_L3, POS_NAR_L3]
EXPECTED_LEN = [14, 16, 12, 10, 12, 16, 16]
EXPECTED_RESP_START = [12, 12, 12, 8, 8, 12, 12]
S = 16  # T + P + T_r + 4 separators/rvq rows


def test_sequence_length_static():
    batch = make_batch(ITEMS)
    assert batch.text.shape == (7, 5) and batch.prom.shape == (7, 3, LEVELS) and batch.resp.shape[:2] == (7, 4)
    np.testing.assert_array_equal(np.asarray(batch.prom_len), [3, 3, 3, 0, 0, 3, 3])
    np.testing.assert_array_equal(np.asarray(batch.resp_len), [2, 4, 0, 2, 4, 4, 4])
    assert batch_rows(cfg_v5(), batch) == S
    assert batch_rows(cfg_v2(), batch) == S - 2  # no rvq row and its separator in version 2


def test_positions_per_segment_v5(params_v5):
    batch = make_batch(ITEMS)
    _, lay = embed(cfg_v5(unified=False), params_v5, batch)
    assert lay.positions.shape == (len(ITEMS), S)
    assert lay.positions.dtype == np.int32
    for b, (pos, n) in enumerate(zip(EXPECTED_POS, EXPECTED_LEN)):
        want = np.array(pos + [1] * (S - len(pos)))  # padding rows get position 1
        np.testing.assert_array_equal(lay.positions[b], want, err_msg=f"item {b}")
        np.testing.assert_array_equal(lay.valid[b], np.arange(S) < n, err_msg=f"item {b}")
    np.testing.assert_array_equal(lay.length, EXPECTED_LEN)
    np.testing.assert_array_equal(lay.resp_start, EXPECTED_RESP_START)


def test_positions_unified_v5(params_v5):
    batch = make_batch(ITEMS)
    _, lay = embed(cfg_v5(unified=True), params_v5, batch)
    for b in range(len(ITEMS)):
        np.testing.assert_array_equal(lay.positions[b], np.arange(S))  # HF default 0..S-1 over the padded row
        np.testing.assert_array_equal(lay.valid[b], np.arange(S) < EXPECTED_LEN[b])
    np.testing.assert_array_equal(lay.length, EXPECTED_LEN)


def _check_common_v5(x, p, b, level):
    """Rows 0-7 of every version-5 item: text, sep, rvq_l_emb[level], sep."""
    np.testing.assert_allclose(x[b, 0:5], E_text(p, TEXT), atol=1e-6)
    np.testing.assert_allclose(x[b, 5], SEP(p), atol=1e-6)
    np.testing.assert_allclose(x[b, 6], RVQ(p, level), atol=1e-6)
    np.testing.assert_allclose(x[b, 7], SEP(p), atol=1e-6)


@pytest.mark.parametrize("sums", [False, True], ids=["nosums", "sums"])
def test_embedded_rows_v5(params_v5, sums):
    p = params_v5
    batch = make_batch(ITEMS)
    x, lay = embed(cfg_v5(sums=sums), p, batch)
    assert x.shape == (len(ITEMS), S, 16)
    p0, p1, p2 = PROM[:, 0], PROM[:, 1], PROM[:, 2]
    r0, r1, r2 = RESP[:, 0], RESP[:, 1], RESP[:, 2]

    # item 0: AR step t = 2 (same with and without sums)
    _check_common_v5(x, p, 0, 0)
    np.testing.assert_allclose(x[0, 8:11], P(p, 0, p0), atol=1e-6)
    np.testing.assert_allclose(x[0, 11], SEP(p), atol=1e-6)
    np.testing.assert_allclose(x[0, 12:14], R(p, 0, r0[:2]), atol=1e-6)
    np.testing.assert_array_equal(x[0, 14:], 0.0)  # right padding: zero vectors (spec 2.6)

    # item 1: NAR level 3; the prompt reads level L-1 (or sums levels 0..L-2), the response R_{k+1}
    _check_common_v5(x, p, 1, 3)
    np.testing.assert_allclose(x[1, 11], SEP(p), atol=1e-6)
    if sums:
        np.testing.assert_allclose(x[1, 8:11], P(p, 0, p0) + P(p, 1, p1), atol=1e-5)
        np.testing.assert_allclose(x[1, 12:16], R(p, 1, r0) + R(p, 2, r1), atol=1e-5)
    else:
        np.testing.assert_allclose(x[1, 8:11], P(p, 2, p2), atol=1e-6)
        np.testing.assert_allclose(x[1, 12:16], R(p, 3, r2), atol=1e-6)

    # item 2: first AR step: rows 0-11, ends with the separator
    _check_common_v5(x, p, 2, 0)
    np.testing.assert_allclose(x[2, 8:11], P(p, 0, p0), atol=1e-6)
    np.testing.assert_allclose(x[2, 11], SEP(p), atol=1e-6)
    np.testing.assert_array_equal(x[2, 12:], 0.0)

    # item 3: prompt-less AR: text sep rvq sep resp (no prompt, no second separator)
    _check_common_v5(x, p, 3, 0)
    np.testing.assert_allclose(x[3, 8:10], R(p, 0, r0[:2]), atol=1e-6)
    np.testing.assert_array_equal(x[3, 10:], 0.0)

    # item 4: prompt-less NAR level 1
    _check_common_v5(x, p, 4, 1)
    np.testing.assert_allclose(x[4, 8:12], R(p, 1, r0), atol=1e-6)
    np.testing.assert_array_equal(x[4, 12:], 0.0)

    # item 5: NAR level 1: P_0[p0] and R_1[r0] with and without sums
    _check_common_v5(x, p, 5, 1)
    np.testing.assert_allclose(x[5, 8:11], P(p, 0, p0), atol=1e-6)
    np.testing.assert_allclose(x[5, 11], SEP(p), atol=1e-6)
    np.testing.assert_allclose(x[5, 12:16], R(p, 1, r0), atol=1e-6)

    # item 6: NAR level 2: sums stop one short -> only level 0; no sums -> level 1
    _check_common_v5(x, p, 6, 2)
    if sums:
        np.testing.assert_allclose(x[6, 8:11], P(p, 0, p0), atol=1e-6)
        np.testing.assert_allclose(x[6, 12:16], R(p, 1, r0), atol=1e-6)
    else:
        np.testing.assert_allclose(x[6, 8:11], P(p, 1, p1), atol=1e-6)
        np.testing.assert_allclose(x[6, 12:16], R(p, 2, r1), atol=1e-6)


def test_embedding_independent_of_position_mode(params_v5):
    batch = make_batch(ITEMS)
    x_a, _ = embed(cfg_v5(unified=False), params_v5, batch)
    x_b, _ = embed(cfg_v5(unified=True), params_v5, batch)
    np.testing.assert_array_equal(x_a, x_b)  # position ids only feed RoPE (spec 2.5)


def test_items_do_not_depend_on_batch_mates(params_v5):
    """An item embedded alone (its own padding) equals its rows inside the mixed batch."""
    cfg = cfg_v5(sums=True)
    x_all, lay_all = embed(cfg, params_v5, make_batch(ITEMS))
    for b in (0, 3, 6):
        x_one, lay_one = embed(cfg, params_v5, make_batch([ITEMS[b]]))
        n = EXPECTED_LEN[b]
        np.testing.assert_allclose(x_one[0, :n], x_all[b, :n], atol=1e-6)
        assert int(lay_one.length[0]) == n


# --------------------------------------------------------------------------------------------------
# version 2 (AudioEmbedding_Old): no rvq segment; AR prompt sums all levels; NAR complete sums
# --------------------------------------------------------------------------------------------------


def test_version2_layout_and_embeddings(params_v2):
    p = params_v2
    assert "rvq_l_emb" not in p
    items = [AR_T2, NAR_L3, NAR_L1, NOPROM_AR]
    batch = make_batch(items)
    S2 = 5 + 3 + 4 + 2
    x, lay = embed(cfg_v2(unified=False), p, batch)
    assert x.shape == (4, S2, 16)
    pos_ar = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1]
    pos_nar = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3]
    pos_noprom = [0, 1, 2, 3, 4, 5, 0, 1]
    for b, pos in enumerate([pos_ar, pos_nar, pos_nar, pos_noprom]):
        np.testing.assert_array_equal(lay.positions[b], pos + [1] * (S2 - len(pos)), err_msg=f"item {b}")
        np.testing.assert_array_equal(lay.valid[b], np.arange(S2) < len(pos))
    np.testing.assert_array_equal(lay.resp_start, [10, 10, 10, 6])

    for b in range(4):
        np.testing.assert_allclose(x[b, 0:5], E_text(p, TEXT), atol=1e-6)
        np.testing.assert_allclose(x[b, 5], SEP(p), atol=1e-6)
    # AR: prompt = sum over all prompt levels; response R_0
    np.testing.assert_allclose(x[0, 6:9], sum(P(p, k, PROM[:, k]) for k in range(LEVELS)), atol=1e-5)
    np.testing.assert_allclose(x[0, 9], SEP(p), atol=1e-6)
    np.testing.assert_allclose(x[0, 10:12], R(p, 0, RESP[:2, 0]), atol=1e-6)
    np.testing.assert_array_equal(x[0, 12:], 0.0)
    # NAR L = 3: sum_{k<3} P_k[p_k], sum_{k<3} R_{k+1}[r_k]
    np.testing.assert_allclose(x[1, 6:9], sum(P(p, k, PROM[:, k]) for k in range(3)), atol=1e-5)
    np.testing.assert_allclose(x[1, 9], SEP(p), atol=1e-6)
    np.testing.assert_allclose(x[1, 10:14], sum(R(p, k + 1, RESP[:, k]) for k in range(3)), atol=1e-5)
    # NAR L = 1: P_0[p0], R_1[r0]
    np.testing.assert_allclose(x[2, 6:9], P(p, 0, PROM[:, 0]), atol=1e-6)
    np.testing.assert_allclose(x[2, 10:14], R(p, 1, RESP[:, 0]), atol=1e-6)
    # prompt-less AR: text sep resp
    np.testing.assert_allclose(x[3, 6:8], R(p, 0, RESP[:2, 0]), atol=1e-6)
    np.testing.assert_array_equal(x[3, 8:], 0.0)

    _, lay_u = embed(cfg_v2(unified=True), p, batch)
    np.testing.assert_array_equal(lay_u.positions, np.broadcast_to(np.arange(S2), (4, S2)))


def test_configs_differ_only_where_intended():
    """The v5 configs above share parameter shapes (one init serves all of them)."""
    a, b = cfg_v5(False, False), cfg_v5(True, True)
    assert dataclasses.replace(a, experimental=b.experimental) == b
    assert a.has_rvq_token and not cfg_v2().has_rvq_token
