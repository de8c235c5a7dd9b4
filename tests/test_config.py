"""Config: presets, derived sizes, YAML round trip, the reference's YAML, overrides, clear errors."""

import jax
import numpy as np
import pytest

from conftest import ROOT
from valle_jax.config import ConfigError, ModelConfig, load_reference_yaml, load_yaml, save_yaml
from valle_jax.models.valle import init_params

CONFIGS = ROOT / "configs"


def n_params(cfg: ModelConfig) -> int:
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


@pytest.mark.parametrize(
    "yaml_name,overrides,expected",
    [  # spec 7.2: parameter counts that match the sizes of the released files
        ("ar+nar-llama-8.yaml", {"experimental.split_classifiers": False}, 220_514_305),
        ("ar+nar-llama-8.yaml", {}, 227_861_505),
        ("ar-llama-1.yaml", {}, 205_827_073),
        ("ar+nar-dac-llama-9.yaml", {}, 222_612_481),
        ("ar+nar-dac-llama-9.yaml", {"experimental.split_classifiers": True}, 231_009_281),
    ],
)
def test_released_configs_have_the_released_parameter_counts(yaml_name, overrides, expected):
    cfg = load_yaml(CONFIGS / yaml_name).override(overrides)
    assert n_params(cfg) == expected


def test_every_config_loads_and_round_trips(tmp_path):
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    for want in ("ar+nar-llama-8.yaml", "ar+nar-retnet-8.yaml", "ar-llama-1.yaml", "nar-llama-8.yaml",
                 "ar+nar-dac-llama-9.yaml", "llama-x4.yaml", "tiny.yaml"):  # fmt: skip
        assert want in names
    for name in names:
        cfg = load_yaml(CONFIGS / name)
        save_yaml(cfg, tmp_path / name)
        assert load_yaml(tmp_path / name) == cfg


def test_presets_and_derived_vocab():
    cfg = ModelConfig(size="half")
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.ffn_dim, cfg.head_dim) == (512, 8, 12, 2048, 64)
    assert ModelConfig(size={"dim": 2048, "layers": 16}).d_model == 1024  # dict sizes are ignored (spec 1.2)
    assert ModelConfig(size="double").n_layers == 24
    assert ModelConfig(capabilities=["ar"], resp_levels=1).l_tokens == [1025]
    assert ModelConfig(capabilities=["nar"]).l_tokens == [1025] + [1024] * 7  # NAR-only keeps the stop row
    assert ModelConfig(capabilities=["ar", "nar"], resp_levels=9).n_resp_tokens == 1025
    gqa = ModelConfig.from_dict({"experimental": {"kv_heads": 4}})
    assert gqa.n_kv_heads == 4 and gqa.n_heads == 16
    assert ModelConfig.from_dict({"experimental": {"rvq_level_range": [1, 5]}}).max_levels == 5


def test_reference_yaml_entry(tmp_path):
    ref = tmp_path / "config.yaml"
    ref.write_text(
        "audio_embedding_sums: true\n"
        "models:\n"
        "- name: ar+nar\n  size: full\n  resp_levels: 8\n  prom_levels: 8\n  tasks: 8\n  langs: 2\n  tones: 1\n"
        "  arch_type: llama\n  training: true\n  version: 5\n  attention: flash_attention_2\n  dropout: 0.1\n"
        "  experimental:\n    split_classifiers: true\n    unified_position_ids: false\n"
        "- name: nar\n  capabilities: [nar]\n  experimental: {}\n"
    )
    cfg = load_reference_yaml(ref)
    assert cfg.experimental.audio_embedding_sums and cfg.experimental.split_classifiers
    assert not cfg.experimental.unified_position_ids and cfg.langs == 2
    assert load_yaml(ref) == cfg
    assert load_reference_yaml(ref, "nar").capabilities == ("nar",)
    with pytest.raises(ConfigError, match="no model named 'ar'"):
        load_reference_yaml(ref, "ar")


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*bogus"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="experimental.nope"):
        ModelConfig.from_dict({"experimental": {"nope": 1}})
    with pytest.raises(ConfigError, match="arch_type = 'mamba'"):
        ModelConfig(arch_type="mamba")
    with pytest.raises(ConfigError, match="version = 4"):
        ModelConfig(version=4)
    with pytest.raises(ConfigError, match="heads"):
        ModelConfig(dim=30, heads=4)
    with pytest.raises(ConfigError, match="unknown field 'dimm'"):
        ModelConfig().override(["dimm=3"])
    assert ModelConfig().override(["experimental.causal_size=4", "dim=64"]).causal_size == 4
    bad = tmp_path / "x.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="x.yaml: not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_configs_are_frozen_hashable_and_typed():
    import dataclasses

    from valle_jax.config import AttentionImpl, CodecKind, TrainConfig, compute_dtype, load_config, runtime_config

    a, b = load_yaml(CONFIGS / "tiny.yaml"), load_yaml(CONFIGS / "tiny.yaml")
    assert a == b and hash(a) == hash(b) and a is not b  # a static jit argument: equal configs share programs
    assert hash(a.override({"experimental.causal_size": 4})) != hash(a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dim = 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.experimental.causal_size = 2
    assert isinstance(a.capabilities, tuple) and isinstance(a.codec, CodecKind) and a.codec == "encodec"
    assert a.attention_impl is AttentionImpl.AUTO and str(a.attention_impl) == "auto"  # decided per platform at run time
    assert a.override({"dim": 128}).dim == 128 and a.dim == 64  # a new config; the old one is unchanged
    run = load_config(ROOT / "configs" / "train-tiny.yaml")
    assert hash(run) == hash(load_config(ROOT / "configs" / "train-tiny.yaml"))
    assert runtime_config(a, "bfloat16", "cudnn").dtype == "bfloat16" and compute_dtype("auto") == "float32"  # CPU here
    assert runtime_config(a).attention_impl is AttentionImpl.XLA  # auto on this CPU
    assert TrainConfig(optimizer="prodigy").optimizer == "prodigy"


@pytest.mark.parametrize("build,field,allowed", [
    (lambda: ModelConfig(codec="wav"), "model.codec = 'wav'", "encodec, vocos, dac"),
    (lambda: ModelConfig(attention_impl="flash"), "model.attention_impl = 'flash'", "xla, cudnn"),
    (lambda: ModelConfig(retnet_mode="fast"), "model.retnet_mode = 'fast'", "parallel, chunkwise, recurrent"),
    (lambda: ModelConfig(tokenizer="sentencepiece"), "model.tokenizer = 'sentencepiece'", "bpe, naive"),
    (lambda: ModelConfig(dtype="float8"), "model.dtype = 'float8'", "float32, bfloat16, float16"),
    (lambda: ModelConfig(dropout=1.5), "model.dropout = 1.5", "<= 1.0"),
    (lambda: ModelConfig.from_dict({"experimental": {"causal_size": 0}}), "model.experimental.causal_size = 0", ">= 1"),
    (lambda: ModelConfig(loss_factors={"txt": 1.0}), "model.loss_factors", "text, prom, resp"),
])  # fmt: skip
def test_construction_validates_and_names_field_and_allowed_values(build, field, allowed):
    with pytest.raises(ConfigError) as e:
        build()
    assert field in str(e.value) and allowed in str(e.value), str(e.value)


@pytest.mark.parametrize("override,needle", [
    ("train.steps=-3", "train.steps = -3: expected >= 0"),
    ("train.learning_rate=-1", "train.learning_rate = -1: expected > 0.0"),
    ("train.optimizer=sgd", "train.optimizer = 'sgd': expected one of adamw, prodigy"),
    ("train.remat=sometimes", "train.remat = 'sometimes'"),
    ("train.grad_accum=0", "train.grad_accum = 0: expected >= 1"),
    ("data.length_buckets=[]", "data.length_buckets = []"),
    ("data.batch_tokens=abc", "data.batch_tokens = 'abc': expected an integer"),
])  # fmt: skip
def test_run_config_blocks_validate_on_load(override, needle):
    from valle_jax.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "train-tiny.yaml", [override])
    assert needle in str(e.value), str(e.value)
