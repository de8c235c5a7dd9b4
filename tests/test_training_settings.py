"""Issue 9 finding 9: reference settings that training used to accept and ignore. Token dropout is trained as the
reference trains it (spec 2.4: `token_dropout_rate` replaces response rows by `dropout_token`, `token_dropout_error`
moves lower-level input codes by +-1, both only inside `token_dropout_rvq_levels` and only in training);
`tie_classifier_to_embedding` and `p_len_train` (no effect in the reference at the ported commit / NAR-len only)
are refused by the trainer with the field named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from valle_jax.config import ConfigError, load_config, load_yaml
from valle_jax.layout import training_batch
from valle_jax.models.valle import VALLE, init_params, token_dropout_error
from valle_jax.train_state import Trainer

TINY = ROOT / "configs" / "tiny.yaml"


def _cfg(**experimental):
    cfg = load_yaml(TINY)
    return cfg.override({f"experimental.{k}": v for k, v in experimental.items()})


def _items(n=3, r=20):
    rng = np.random.default_rng(0)
    return [{"text": rng.integers(1, 200, 6), "prom": rng.integers(0, 1024, (9, 8)), "resp": rng.integers(2, 1020, (r, 8))}
            for _ in range(n)]  # fmt: skip


def _embed(cfg, params, batch, deterministic, seed=0):
    f = jax.jit(lambda p, b: VALLE(cfg).apply({"params": p}, b, None, deterministic, method=VALLE.embed,
                                              rngs=None if deterministic else {"dropout": jax.random.key(seed)}))  # fmt: skip
    x, lay = f(params, batch)
    return np.asarray(x), jax.tree.map(np.asarray, lay)


def test_token_dropout_rate_replaces_response_rows_in_training_only():
    cfg = _cfg(token_dropout_rate=1.0, token_dropout_rvq_levels=[0, 3])
    params = init_params(cfg, jax.random.key(0))
    params["dropout_token"] = jnp.full_like(params["dropout_token"], 7.0)  # recognisable rows
    batch = training_batch(cfg, _items(), [0, 2, 5])  # level 5 lies outside [0, 3]
    x_eval, lay = _embed(cfg, params, batch, deterministic=True)
    x_train, _ = _embed(cfg, params, batch, deterministic=False)
    start, n = np.asarray(lay.resp_start), np.asarray(batch.resp_len)
    dropped = np.all(x_train == 7.0, axis=-1)
    assert not np.any(np.all(x_eval == 7.0, axis=-1))  # inference: untouched
    # level 0: every response row but the stop token; level 2: every row; level 5: none
    assert np.array_equal(np.flatnonzero(dropped[0]), np.arange(start[0], start[0] + n[0] - 1))
    assert np.array_equal(np.flatnonzero(dropped[1]), np.arange(start[1], start[1] + n[1]))
    assert not dropped[2].any()
    outside = ~dropped
    np.testing.assert_array_equal(x_train[outside], x_eval[outside])  # nothing else changes

    half = dataclasses.replace(cfg, experimental=dataclasses.replace(cfg.experimental, token_dropout_rate=0.3,
                                                                     token_dropout_rvq_levels=()))  # fmt: skip
    batch = training_batch(half, _items(8, r=200), [1] * 8)  # the default range [1, resp_levels]
    x, lay = _embed(half, params, batch, deterministic=False, seed=3)
    rows = np.all(x == 7.0, axis=-1)[np.asarray(lay.segment) == 3]
    assert 0.25 < rows.mean() < 0.35, rows.mean()


def test_token_dropout_error_moves_lower_level_codes_by_one():
    cfg = _cfg(token_dropout_error=1.0, token_dropout_rvq_levels=[1, 6])
    rng = np.random.default_rng(1)
    codes = jnp.asarray(rng.integers(0, 1024, (4, 50, 8)), jnp.int32)
    codes = codes.at[0, 0, 0].set(0).at[0, 1, 0].set(1023)  # the clamp to [1, 1022]
    levels = jnp.asarray([0, 1, 4, 7])  # 0: no lower levels; 7: outside [1, 6]
    out = np.asarray(token_dropout_error(cfg, codes, levels, jax.random.key(0)))
    c = np.asarray(codes)
    assert np.array_equal(out[0], c[0]) and np.array_equal(out[3], c[3])
    assert np.array_equal(out[1][:, 1:], c[1][:, 1:]) and np.array_equal(out[2][:, 4:], c[2][:, 4:])  # level L and up
    moved = np.concatenate([out[1][:, :1].ravel() - c[1][:, :1].ravel(), out[2][:, :4].ravel() - c[2][:, :4].ravel()])
    lower = np.concatenate([c[1][:, :1].ravel(), c[2][:, :4].ravel()])
    inside = (lower > 1) & (lower < 1022)
    assert set(np.unique(moved[inside])) == {-1, 1}
    assert 0.4 < np.mean(moved[inside] == 1) < 0.6
    assert np.all((out[1:3] >= 1) & (out[1:3] <= 1022) | (out[1:3] == c[1:3]))

    cfg = _cfg(token_dropout_error=0.25)  # default range; a fraction of the codes move
    out = np.asarray(token_dropout_error(cfg, codes, jnp.full((4,), 7), jax.random.key(5)))
    frac = np.mean(out[:, :, :7] != c[:, :, :7])
    assert 0.2 < frac < 0.3, frac


def test_token_dropout_trains_the_dropout_token():
    """In training the dropout token gets a gradient through the loss (a trained parameter in the reference); with
    token dropout off it gets none."""
    from valle_jax.models.loss import loss as reference_loss

    def grad_of_dropout_token(rate):
        cfg = _cfg(token_dropout_rate=rate)
        params = init_params(cfg, jax.random.key(0))
        batch = training_batch(cfg, _items(), [1, 2, 3])

        def objective(p):
            logits, _ = VALLE(cfg).apply({"params": p}, batch, False, rngs={"dropout": jax.random.key(1)})
            return reference_loss(cfg, logits, batch, faithful_nan=False)[0]

        return np.asarray(jax.jit(jax.grad(objective))(params)["dropout_token"])

    assert np.abs(grad_of_dropout_token(0.5)).sum() > 0
    assert np.abs(grad_of_dropout_token(0.0)).sum() == 0


@pytest.mark.parametrize("override,field", [
    ("model.experimental.tie_classifier_to_embedding=true", "model.experimental.tie_classifier_to_embedding = True"),
    ("model.experimental.p_len_train=0.2", "model.experimental.p_len_train = 0.2"),
    ("model.dropout_token=false", "model.experimental.token_dropout_rate = 0.1"),
])  # fmt: skip
def test_ignored_reference_settings_are_refused_by_the_trainer(override, field):
    extra = ["model.experimental.token_dropout_rate=0.1"] if "dropout_token" in override else []
    cfg = load_config(ROOT / "configs" / "train-tiny.yaml", [override, *extra])
    with pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert field in str(e.value), str(e.value)


def test_token_dropout_settings_are_validated():
    with pytest.raises(ConfigError, match="token_dropout_rate = 1.5"):
        _cfg(token_dropout_rate=1.5)
    with pytest.raises(ConfigError, match="token_dropout_rvq_levels"):
        _cfg(token_dropout_rvq_levels=[1, 2, 3])
