"""Training losses against the reference's (fixture README section 6): 1e-5 relative, NaN where it gives NaN."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ALL_VARIANTS, VARIANTS, fixture_paths, heads_of
from valle_jax.config import ModelConfig
from valle_jax.convert import load_any
from valle_jax.models import loss as L
from valle_jax.models.valle import VALLE
from tools.parity import loss_outputs
from valle_jax.layout import training_batch

RTOL = 1e-5


def _check(got: float, want: float, what: str):
    if math.isnan(want):
        assert math.isnan(got), f"{what}: reference gives NaN, got {got}"
    else:
        assert abs(got - want) <= RTOL * abs(want), f"{what}: {got} vs {want}"


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_losses_match_reference(name):
    ckpt, npz = fixture_paths(name)
    inputs = dict(np.load(npz))
    cfg, params = load_any(ckpt, heads=heads_of(ckpt))
    out = loss_outputs(cfg, params, inputs)
    keys = sorted(k for k in inputs if k.startswith("loss_s") and not k.endswith("_levels"))
    assert sorted(out) == keys
    for k in keys:
        _check(float(out[k]), float(inputs[k]), f"{name} {k}")
    # the manifest's values agree (null = NaN)
    for s in VARIANTS[name]["loss"]["sets"]:
        want = s["split"]["loss"]["prom"]
        assert (want is None) == math.isnan(float(out[f"loss_{s['name']}_split_prom"]))


def test_parity_tool_loss_mode(tmp_path):
    from tools import parity

    ckpt, npz = fixture_paths("llama_x4")
    assert parity.main(["--checkpoint", str(ckpt), "--inputs", str(npz), "--out", str(tmp_path / "o.npz"), "--loss", "--levels", "0"]) == 0
    got = np.load(tmp_path / "o.npz")
    assert "loss_s1_split_resp" in got.files and math.isnan(float(got["loss_s0_split_prom"]))


def test_level_distribution_is_the_reference_multiset():
    assert ModelConfig().training_levels == [i for i in range(8) for _ in range(8 - i)]  # P(i) = (8 - i) / 36
    nar = ModelConfig(capabilities=["nar"])
    assert nar.training_levels == [i for i in range(1, 8) for _ in range(8 - i)]
    eq = ModelConfig.from_dict({"experimental": {"p_rvq_levels": "equal"}})
    assert eq.training_levels == ModelConfig().training_levels  # "equal" behaves like "auto" upstream
    assert ModelConfig.from_dict({"experimental": {"p_rvq_levels": [0, 0, 5]}}).training_levels == [0, 0, 5]


def test_training_never_sees_nan_from_an_empty_segment():
    """Sums on: every prompt target is ignored; the reference's split loss is NaN, the trainer's is finite."""
    ckpt, npz = fixture_paths("llama_v5_split_sums_nonunified")
    inputs = dict(np.load(npz))
    cfg, params = load_any(ckpt, heads=heads_of(ckpt))
    items = [{"text": inputs[f"loss_batch_text_{i}"], "prom": inputs[f"loss_batch_prom_{i}"], "resp": inputs[f"loss_batch_resp_{i}"]} for i in range(2)]
    batch = training_batch(cfg, items, [0, 3])
    logits, _ = VALLE(cfg).apply({"params": params}, batch)
    factors = {"text": 0.1, "prom": 0.5, "resp": 1.0}
    faithful, parts = L.split_loss(cfg, logits, batch, factors, faithful_nan=True)
    assert math.isnan(float(faithful)) and math.isnan(float(parts["prom"]))
    safe, parts_safe = L.split_loss(cfg, logits, batch, factors, faithful_nan=False)
    assert float(parts_safe["prom"]) == 0.0
    assert abs(float(safe) - float(parts["text"] + parts["resp"])) < 1e-5 * float(safe)

    def total(p):
        lg, _ = VALLE(cfg).apply({"params": p}, batch)
        return L.split_loss(cfg, lg, batch, factors, faithful_nan=False)[0]

    grads = jax.jit(jax.grad(total))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
