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
    assert load_reference_yaml(ref, "nar").capabilities == ["nar"]
    with pytest.raises(ConfigError, match="no model named 'ar'"):
        load_reference_yaml(ref, "ar")


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*bogus"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="experimental.nope"):
        ModelConfig.from_dict({"experimental": {"nope": 1}})
    with pytest.raises(ConfigError, match="arch_type = 'mamba'"):
        ModelConfig(arch_type="mamba").validate()
    with pytest.raises(ConfigError, match="version = 4"):
        ModelConfig(version=4).validate()
    with pytest.raises(ConfigError, match="heads"):
        ModelConfig(dim=30, heads=4).validate()
    with pytest.raises(ConfigError, match="unknown field 'dimm'"):
        ModelConfig().override(["dimm=3"])
    assert ModelConfig().override(["experimental.causal_size=4", "dim=64"]).causal_size == 4
    bad = tmp_path / "x.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="x.yaml: not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
