"""Which attention runs where (issue 11): `attention_impl: auto` is cuDNN flash attention on GPU (bf16/fp16), Pallas
splash attention on TPU and XLA on CPU; attention dropout is explicit and only the XLA path applies it; the splash
kernel (Pallas interpret mode on this CPU) gives XLA attention's numbers, alone, inside the model and sharded."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from valle_jax.config import AttentionImpl, ConfigError, ModelConfig, describe_attention, load_yaml, resolve_attention, runtime_config
from valle_jax.layout import make_batch
from valle_jax.models import backbone
from valle_jax.models.llama import attend_splash, attend_xla, attention_path, causal_mask, splash_tile
from valle_jax.models.valle import VALLE, init_params


@pytest.mark.parametrize("platform,dtype,dropout,expected", [
    ("cpu", "float32", None, "xla"),
    ("cpu", "bfloat16", None, "xla"),
    ("gpu", "bfloat16", None, "cudnn"),
    ("gpu", "float16", None, "cudnn"),
    ("gpu", "float32", None, "xla"),  # cuDNN's fused attention takes fp16/bf16 only
    ("tpu", "bfloat16", None, "splash"),
    ("tpu", "float32", None, "splash"),
    ("gpu", "bfloat16", 0.1, "xla"),  # an explicit attention dropout keeps the one path that can apply it
    ("tpu", "bfloat16", 0.1, "xla"),
    ("tpu", "bfloat16", 0.0, "splash"),
    ("rocm", "bfloat16", None, "xla"),  # AMD GPUs: no cuDNN
])  # fmt: skip
def test_auto_picks_the_kernel_of_the_platform(platform, dtype, dropout, expected):
    assert resolve_attention("auto", dtype, platform, dropout) == expected
    cfg = ModelConfig(attention_dropout=dropout)
    run = runtime_config(cfg, dtype, platform=platform)
    assert run.attention_impl == expected
    fused = expected in ("cudnn", "splash")
    # the dropout that runs: the reference's model.dropout (0.1) on XLA unless set, never any on a fused kernel
    assert run.attention_dropout_rate == (0.0 if fused else (dropout if dropout is not None else cfg.dropout))
    for explicit in ("xla", "cudnn", "splash"):  # an explicit choice is kept wherever it is asked for
        assert resolve_attention(explicit, dtype, platform, None) == explicit
    # Pallas kernels are interpreted exactly when the platform compiled for is not a TPU: from the platform given,
    # not from this CPU host's default backend (a TPU program compiled ahead of time here gets the real kernel)
    assert run.platform == platform and run.kernel_interpret == (platform != "tpu")
    assert run.cpu_layouts == (platform == "cpu")  # CPU-only layouts (2-d Dense products, heads-first XLA attention)


def test_dropout_on_a_fused_kernel_is_refused_and_the_default_is_said():
    for impl in ("cudnn", "splash"):
        with pytest.raises(ConfigError) as e:
            ModelConfig(attention_impl=impl, attention_dropout=0.1)
        msg = str(e.value)
        assert "model.attention_dropout = 0.1" in msg and f"attention_impl={impl}" in msg and "model.attention_impl=xla" in msg
        quiet = ModelConfig(attention_impl=impl)  # dropout unset: the fused kernel runs without it, and says so
        assert quiet.attention_dropout_rate == 0.0
        line = describe_attention(quiet)
        assert line.startswith(f"attention {impl}, attention dropout 0") and "model.dropout = 0.1 is not applied" in line
    xla = ModelConfig(attention_impl="xla")
    assert xla.attention_dropout_rate == 0.1 and describe_attention(xla) == "attention xla, attention dropout 0.1"
    with pytest.raises(ConfigError, match="model.attention_dropout = 1.5"):
        ModelConfig(attention_dropout=1.5)


def test_attention_path_names_what_runs():
    splash = ModelConfig(attention_impl="splash")
    assert attention_path(splash, 256, cached=False) == "splash"
    assert attention_path(splash, 200, cached=False) == "splash"  # padded to the kernel's 128-row tile
    assert attention_path(splash, 256, cached=True) == "xla"  # KV-cached decoding
    assert attention_path(ModelConfig(attention_impl="cudnn"), 200, cached=False) == "cudnn"
    assert attention_path(ModelConfig(), 256, cached=False) == "xla"  # auto never resolved
    # through the backbone registry (what training logs and the benchmarks report): RetNet has no attention choice
    assert backbone.attention_path(splash, 256) == "splash"
    assert backbone.attention_path(ModelConfig(arch_type="retnet", attention_impl="cudnn"), 256) == "retnet"


def _qkv(B=2, S=200, H=4, K=2, Dh=64, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, S, H, Dh)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, K, Dh)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, K, Dh)), jnp.float32)
    valid = jnp.asarray(np.arange(S)[None, :] < np.array([[S], [S - 37]]), bool)  # the second item right-padded
    return q, k, v, valid


@pytest.mark.parametrize("S,tile", [(200, 256), (700, 384)])  # one tile; two tiles (pairs below the diagonal)
def test_splash_kernel_equals_xla_attention_values_and_gradients(S, tile):
    assert splash_tile(-(-S // 128) * 128) == tile
    q, k, v, valid = _qkv(S=S)
    mask = causal_mask(valid)
    ref = attend_xla(q, k, v, mask, None)
    out = attend_splash(q, k, v, valid, interpret=True)
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=2e-5, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))  # padding rows stay finite

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.where(valid[..., None, None], f(q, k, v), 0.0) ** 2)

    g_ref = jax.grad(loss(lambda q, k, v: attend_xla(q, k, v, mask, None)), argnums=(0, 1, 2))(q, k, v)
    g_out = jax.grad(loss(lambda q, k, v: attend_splash(q, k, v, valid, interpret=True)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)


def _tiny(impl):
    cfg = load_yaml(ROOT / "configs" / "tiny.yaml").override({"heads": 1, "attention_impl": impl})  # head_dim 64
    return dataclasses.replace(cfg, dtype="float32", platform="cpu")  # Pallas on this CPU: interpret mode


def _batch(cfg, rows=110):  # the longest item takes 105 rows; splash pads to its 128-row tile
    items = []
    for t, p, r, level in ((10, 30, 60, 0), (7, 20, 40, 3)):
        rng = np.random.default_rng(t)
        items.append({"text": rng.integers(1, 200, t), "prom": rng.integers(0, 1024, (p, 8)),
                      "resp": rng.integers(0, 1024, (r, 8)), "level": level})  # fmt: skip
    return make_batch(items, q=8), rows


def test_splash_in_the_model_gives_xla_logits():
    xla = _tiny("xla")
    params = init_params(xla, jax.random.key(0))
    batch, rows = _batch(xla)
    want, lay = VALLE(xla).apply({"params": params}, batch, n_rows=rows)
    got, _ = VALLE(_tiny("splash")).apply({"params": params}, batch, n_rows=rows)
    valid = np.asarray(lay.valid)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=5e-5, rtol=1e-5)


def test_splash_sharded_over_a_mesh_gives_the_single_device_numbers():
    """Under a (data, tensor) mesh the kernel runs per shard (shard_map over batch and heads)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    import flax.linen as nn

    from valle_jax import parallel
    from valle_jax.config import MeshConfig

    q, k, v, valid = _qkv(H=4, K=4)
    ref = attend_xla(q, k, v, causal_mask(valid), None)
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    rules = parallel.axis_rules(MeshConfig())

    def f(q, k, v, valid):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return attend_splash(q, k, v, valid, interpret=True)

    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
    assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v, valid))  # the kernel runs per shard
    out = jax.jit(f)(put(q), put(k), put(v), put(valid))
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=2e-5, rtol=1e-5)


def test_attention_impl_enum_values():
    assert [e.value for e in AttentionImpl] == ["auto", "xla", "cudnn", "splash"]


def test_cpu_layouts_give_the_accelerator_forms_numbers():
    """On CPU the model multiplies Dense layers over 2-d rows and puts heads first in XLA attention
    (ModelConfig.cpu_layouts); compiled for another platform it keeps the 3-d forms. Both forms, run here, give
    the same logits and gradients (values and attention dropout included)."""
    cpu = dataclasses.replace(_tiny("xla"), platform="cpu")
    other = dataclasses.replace(cpu, platform="gpu")
    assert cpu.cpu_layouts and not other.cpu_layouts
    params = init_params(cpu, jax.random.key(0))
    batch, rows = _batch(cpu)

    def loss(cfg, deterministic):
        def f(p):
            logits, lay = VALLE(cfg).apply({"params": p}, batch, deterministic=deterministic, n_rows=rows,
                                           rngs=None if deterministic else {"dropout": jax.random.key(3)})  # fmt: skip
            return jnp.sum(jnp.where(lay.valid[..., None], logits, 0.0) ** 2) / 1e4
        return jax.jit(jax.value_and_grad(f))(params)

    for deterministic in (True, False):
        (a, ga), (b, gb) = loss(cpu, deterministic), loss(other, deterministic)
        np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
        for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [529, 6])
def test_dropout_keep_rate_scale_and_key(n):
    from valle_jax.models.llama import dropout_keep

    keep, scale = dropout_keep(jax.random.key(0), (3, 40, n), 0.1)
    assert keep.shape == (3, 40, n) and keep.dtype == jnp.bool_
    assert scale == pytest.approx(65536 / (65536 - 6554))  # 1 / the quantized keep probability: unbiased
    if n > 100:  # 63480 draws: the dropped fraction is 0.1 within 5 standard deviations (0.0012 each)
        assert abs(1.0 - float(keep.mean()) - 0.1) < 0.006
    again, _ = dropout_keep(jax.random.key(0), (3, 40, n), 0.1)
    other, _ = dropout_keep(jax.random.key(1), (3, 40, n), 0.1)
    assert np.array_equal(np.asarray(keep), np.asarray(again))
    assert not np.array_equal(np.asarray(keep), np.asarray(other))


def test_device_platform_tells_amd_from_nvidia_gpus():
    """JAX names both vendors' GPUs "gpu"; the runtime choices need to know which (cuDNN exists only on NVIDIA).
    Stand-ins for devices carry the two attributes read (no GPU here)."""
    from types import SimpleNamespace as NS

    from valle_jax.config import device_platform

    rocm = NS(platform="gpu", client=NS(platform_version="PJRT C API\nrocm 60304"))
    cuda = NS(platform="gpu", client=NS(platform_version="PJRT C API\ncuda 12080"))
    assert [device_platform(d) for d in (rocm, cuda)] == ["rocm", "gpu"]
    assert device_platform(jax.devices()[0]) == "cpu"
    assert runtime_config(ModelConfig(), "bfloat16", platform=device_platform(rocm)).attention_impl == "xla"
    assert runtime_config(ModelConfig(), "bfloat16", platform=device_platform(cuda)).attention_impl == "cudnn"


def test_dropout_keep_at_rate_one_drops_everything():
    """model.dropout = 1 is a valid config (flax's Dropout gives zeros there): no division by a zero keep rate."""
    from valle_jax.models.llama import dropout_keep

    keep, scale = dropout_keep(jax.random.key(0), (2, 7), 1.0)
    assert not np.asarray(keep).any() and scale == 0.0
