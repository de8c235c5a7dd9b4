"""Sharded training on 8 fake CPU devices equals the single-device step (float32 tolerance).

conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 and highest matmul precision. The
single-device reference and every mesh start from the same parameters and see the same two batches; dropout
is on (threefry keys are partitionable, so the masks do not depend on the layout). Besides losses and params
(which AdamW and clipping make blind to a constant factor on the gradient), the gradient norm of every step is
compared: a sum where a mean belongs (psum for pmean over N shards, a missing 1/A in accumulation) fails it.
"""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from valle_jax import parallel
from valle_jax.config import ConfigError, MeshConfig, load_config
from valle_jax.data.synthetic import make_iterator
from valle_jax.train_state import Trainer

ROOT = Path(__file__).resolve().parents[1]
MESHES = {"data8": MeshConfig(data=8), "d2f2t2": MeshConfig(data=2, fsdp=2, tensor=2), "f4t2": MeshConfig(data=1, fsdp=4, tensor=2)}
EXTRA = {"f4t2": ["train.remat=full"]}  # remat changes no number: checked on one of the meshes
STEPS = 2


def tiny_cfg(*overrides):
    return load_config(ROOT / "configs" / "train-tiny.yaml",
                       ["train.learning_rate=0.001", "train.warmup_steps=0", "train.schedule=constant", *overrides])


def batches(cfg, n=STEPS):
    it = make_iterator(cfg)
    return [next(it) for _ in range(n)]


def run(trainer, params, data, grad_norms=None):
    state = trainer.init_state(params)
    losses = []
    for b in data:
        state, m = trainer.train_step(state, b)
        losses.append(float(m["loss"]))
        if grad_norms is not None:
            grad_norms.append(float(m["grad_norm"]))
    return losses, jax.tree.map(np.asarray, parallel.to_host(state["params"]))


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def reference():
    assert jax.device_count() == 8, "conftest.py should give 8 fake CPU devices"
    cfg = tiny_cfg()
    single = Trainer(cfg, mesh=parallel.make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    params0 = jax.tree.map(np.asarray, single.init_state()["params"])
    data = batches(cfg)
    norms = []
    losses, params = run(single, params0, data, norms)
    return cfg, params0, data, losses, params, norms


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_equals_single_device(reference, name, capfd):
    _, params0, data, ref_losses, ref_params, ref_norms = reference
    cfg = dataclasses.replace(tiny_cfg(*EXTRA.get(name, [])), mesh=MESHES[name])
    trainer = Trainer(cfg)
    assert trainer.mesh.devices.size == 8
    norms = []
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # compiled here, so that XLA's warnings are seen
    try:
        losses, params = run(trainer, params0, data, norms)
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(norms, ref_norms, rtol=2e-5)  # the gradient's scale, not only its direction
    assert max_diff(params, ref_params) < 2e-5, name
    # activations carry their shardings: XLA found no layout it had to replicate to get out of (it used to,
    # around the embedding lookups' gradients, on fsdp x tensor meshes)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    assert max_diff(params, params0) > 1e-4  # the steps did change the weights


def test_rules_table_shards_params_and_optimizer_state(reference):
    cfg, params0, data, _, _, _ = reference
    cfg = dataclasses.replace(cfg, mesh=MESHES["d2f2t2"])
    trainer = Trainer(cfg)
    q = trainer.param_sharding["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.spec == P("fsdp", "tensor")  # ("embed", "q_heads") -> (fsdp, tensor)
    down = trainer.param_sharding["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert down.spec == P("tensor", "fsdp")  # ("mlp", "embed")
    # embedding tables: the model dim is replicated ("table_embed"); a 1025-row table does not divide over
    # tensor=2, so that dimension stays whole too; a 1024-row one is split over tensor
    assert trainer.param_sharding["resps_emb"]["embeddings_0"]["embedding"].spec == P()
    assert trainer.param_sharding["resps_emb"]["embeddings_1"]["embedding"].spec == P("tensor")
    # a 1025-wide head does not divide over tensor=2: that dimension stays whole, `embed` is still split
    assert trainer.param_sharding["classifiers"]["proj_0"]["kernel"].spec == P("fsdp")
    assert trainer.param_sharding["classifiers"]["proj_1"]["kernel"].spec == P("fsdp", "tensor")
    state = trainer.init_state(params0)
    arr = state["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert arr.sharding.spec == P("fsdp", "tensor")
    assert arr.addressable_shards[0].data.shape == (arr.shape[0] // 2, arr.shape[1] // 2)
    # Adam moments follow their parameter; counts and the step counter are replicated
    q_path = ("model", "layers_0", "self_attn", "q_proj", "kernel")
    opt = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
    moments = [x for path, x in opt if tuple(getattr(k, "key", None) for k in path[-5:]) == q_path]
    assert len(moments) == 2 and all(x.sharding.spec == P("fsdp", "tensor") for x in moments)
    assert all(x.sharding.spec == P() for _, x in opt if x.ndim == 0)
    assert state["step"].sharding.spec == P()
    # the batch is split over data x fsdp = 4 shards
    b = trainer.device_batch(data[0])
    assert b.text.sharding.spec == P(("data", "fsdp")) and b.text.addressable_shards[0].data.shape[0] == 2


def test_mesh_shape_fill_and_errors():
    assert parallel.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert parallel.mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    with pytest.raises(ConfigError, match="needs 6 devices"):
        parallel.mesh_shape(MeshConfig(data=3, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="at most one"):
        parallel.mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ConfigError, match="unknown mesh axis"):
        parallel.axis_rules(MeshConfig(axis_rules=[["embed", "model"]]))


def test_grad_accumulation_matches_plain_step(reference):
    """grad_accum=2 (a scan over two half batches, each device keeping its rows) gives the plain step's result
    (no dropout: accumulation draws one dropout key per micro-batch)."""
    _, params0, data, _, _, _ = reference
    mesh = parallel.make_mesh(MeshConfig(data=2), jax.devices()[:2])
    plain = Trainer(tiny_cfg("model.dropout=0.0"), mesh=mesh)
    ref_norms, norms = [], []
    ref_losses, ref_params = run(plain, params0, data, ref_norms)
    losses, params = run(Trainer(tiny_cfg("model.dropout=0.0", "train.grad_accum=2"), mesh=mesh), params0, data, norms)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=2e-5)  # accumulated gradients are a mean, not a sum
    assert max_diff(params, ref_params) < 2e-5


def test_remat_wraps_each_decoder_layer():
    """train.remat wraps every decoder layer in a checkpoint (remat) region of the traced step; "none" adds none."""
    import re

    for policy, expected in (("none", 0), ("full", 2), ("dots", 2)):
        trainer = Trainer(tiny_cfg(f"train.remat={policy}"), mesh=parallel.make_mesh(MeshConfig(data=1), jax.devices()[:1]))
        batch = trainer.device_batch(next(make_iterator(trainer.cfg)))
        jaxpr = str(jax.make_jaxpr(trainer._train_step_fn)(trainer.abstract_state, batch))
        assert len(re.findall(r"\bremat2?\[", jaxpr)) + len(re.findall(r"\bcheckpoint\[", jaxpr)) == expected, policy
    with pytest.raises(ConfigError, match="train.remat"):
        Trainer(tiny_cfg("train.remat=sometimes"))
