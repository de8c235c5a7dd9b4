"""The backbone interface: a toy backbone defined here, in the test file, plugs into training, generation and
model directories through the registry alone (no library file knows it).

The toy is a causal running-mean mixer: row t sees the mean of the valid input rows 0..t, through a few
residual layers. Its incremental state is (sum of the rows so far, their count), so a prefill followed by
decode steps must give exactly what the whole-sequence form gives -- a check that generation drives the
interface (init_state, state in, state out) and not a backbone it knows.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from valle_jax import parallel, pipeline
from valle_jax.checkpoint import load_model_dir, save_model_dir
from valle_jax.config import ConfigError, MeshConfig, ModelConfig, load_config
from valle_jax.data.synthetic import make_iterator
from valle_jax.generate import ar_generate, ar_generate_full, nar_generate
from valle_jax.layout import make_batch
from valle_jax.models import backbone
from valle_jax.models.valle import VALLE, init_params
from valle_jax.train_state import Trainer


class ToyLayer(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, h, mean):
        d = self.cfg.d_model
        mix = nn.Dense(d, name="mix")(h) + nn.Dense(d, use_bias=False, name="context")(mean)
        return h + nn.Dense(d, name="out")(jnp.tanh(mix))


class ToyDecoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, valid, state=None, deterministic=True, step=False):
        v = valid[..., None].astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        prev_sum = 0.0 if state is None else state["sum"][:, None, :]
        prev_n = 0.0 if state is None else state["count"][:, None, None]
        csum = jnp.cumsum(x32 * v, axis=1) + prev_sum  # padding rows add nothing
        count = jnp.cumsum(v, axis=1) + prev_n
        mean = csum / jnp.maximum(count, 1.0)
        layer_cls = backbone.remat_layer(ToyLayer, self.cfg)
        h = x32
        for i in range(self.cfg.n_layers):
            h = layer_cls(self.cfg, deterministic, name=f"layers_{i}")(h, mean)
        h = nn.LayerNorm(name="norm")(h)
        new_state = None if state is None else {"sum": csum[:, -1], "count": count[:, -1, 0]}
        return h.astype(self.cfg.dtype), new_state


backbone.register(backbone.Backbone(
    name="toy_running_mean",
    decoder=ToyDecoder,
    init_state=lambda cfg, batch, max_len: {"sum": jnp.zeros((batch, cfg.d_model), jnp.float32),
                                            "count": jnp.zeros((batch,), jnp.float32)},
    state_axes=lambda cfg: {"sum": ("batch", "embed"), "count": ("batch",)},
))  # fmt: skip

OVERRIDES = ["model.arch_type=toy_running_mean", "model.dropout=0.0", "train.warmup_steps=0"]


def toy_model_config() -> ModelConfig:
    return load_config(ROOT / "configs" / "train-tiny.yaml", OVERRIDES).model


def test_config_accepts_registered_backbones_only():
    assert "toy_running_mean" in backbone.names() and {"llama", "retnet"} <= set(backbone.names())
    assert toy_model_config().arch_type == "toy_running_mean"
    with pytest.raises(ConfigError, match="arch_type = 'mamba'.*registered backbone"):
        ModelConfig(arch_type="mamba")


@pytest.mark.parametrize("remat", ["none", "full"])
def test_training_steps_with_the_toy_backbone(remat):
    cfg = load_config(ROOT / "configs" / "train-tiny.yaml", OVERRIDES + [f"train.remat={remat}", "train.learning_rate=0.01"])
    trainer = Trainer(cfg, mesh=parallel.make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    batch = next(make_iterator(cfg))
    if remat == "full":  # the toy's layers are wrapped by the interface's remat helper
        jaxpr = str(jax.make_jaxpr(trainer._train_step_fn)(trainer.abstract_state, trainer.device_batch(batch)))
        assert len(re.findall(r"\bremat2?\[", jaxpr)) + len(re.findall(r"\bcheckpoint\[", jaxpr)) == cfg.model.n_layers
    state = trainer.init_state()
    p0 = jax.tree.map(np.asarray, state["params"])
    losses = []
    for _ in range(3):
        state, m = trainer.train_step(state, batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    toy = np.asarray(state["params"]["model"]["layers_0"]["mix"]["kernel"])
    assert not np.allclose(toy, p0["model"]["layers_0"]["mix"]["kernel"])  # the backbone's own params train


@pytest.fixture(scope="module")
def toy():
    cfg = toy_model_config()
    params = init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(0)
    items = [{"text": rng.integers(1, 200, n), "prom": rng.integers(0, 1024, (p, 8)), "resp": np.zeros((1, 1), np.int32)}
             for n, p in ((9, 12), (5, 20), (13, 7))]  # fmt: skip
    return cfg, params, items


def test_prefill_and_decode_equal_the_whole_sequence_form(toy):
    cfg, params, items = toy
    batch = make_batch(items, pad_to={"text": 16, "prom": 24})
    cached = jax.jit(lambda p, b: ar_generate(cfg, p, b, 20))(params, batch)
    full = jax.jit(lambda p, b: ar_generate_full(cfg, p, b, 20))(params, batch)
    np.testing.assert_array_equal(np.asarray(cached.n_raw), np.asarray(full.n_raw))
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(full.tokens))
    codes = nar_generate(cfg, params, batch._replace(resp_len=jnp.full((3,), 20, jnp.int32)), cached.tokens[:, :20] % 1024)
    assert codes.shape == (3, 20, 8) and int(jnp.max(codes)) < 1024


def test_synthesis_pipeline_runs_the_toy_backbone(toy):
    """Continuous batching (prefill, insert, chunked decode) through the library's synthesis pipeline."""
    cfg, params, items = toy
    models = pipeline.Models(cfg, params, cfg, params)
    requests = [pipeline.Request(i, [np.asarray(it["text"], np.int32)], np.asarray(it["prom"], np.int32), 12)
                for i, it in enumerate(items)]  # fmt: skip
    outs = {o.id: o for o in pipeline.Synthesizer(models, pipeline.Settings.greedy(slots=2, chunk=4)).run(requests, progress=False)}
    assert sorted(outs) == [0, 1, 2] and all(o.error is None for o in outs.values())
    alone = jax.jit(lambda p, b: ar_generate(cfg, p, b, 12))
    for i, it in enumerate(items):  # each item's level 0 equals the one-shot loop on it alone
        res = alone(params, make_batch([it]))
        want = pipeline.level0(np.asarray(res.tokens[0, : int(res.n_raw[0])]), cfg)
        np.testing.assert_array_equal(outs[i].codes[0][:, 0], want)


def test_model_directory_round_trip(toy, tmp_path):
    cfg, params, items = toy
    save_model_dir(tmp_path / "toy", cfg, params)
    cfg2, params2, _ = load_model_dir(tmp_path / "toy")
    assert cfg2 == cfg and hash(cfg2) == hash(cfg)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), params, params2))
    batch = make_batch([{**items[0], "resp": np.zeros((4, 8), np.int32), "level": 3}])
    a = VALLE(cfg).apply({"params": params}, batch)[0]
    b = VALLE(cfg2).apply({"params": params2}, batch)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
