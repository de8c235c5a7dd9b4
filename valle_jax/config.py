"""Typed configuration: the reference's `Model` fields, our backbone numerics, YAML load/save.

Precedence (DESIGN.md): checkpoint (key shapes, `.sft` metadata) < YAML < CLI `key=value` overrides.
Field names of `ModelConfig` and `Experimental` are the reference's own (spec section 1), so a block of the
reference's YAML `models:` list loads as is; the fields after them are ours (explicit sizes, numerics).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

# Spec 1.2: (dim, heads, layers); FFN is 4 * dim, head_dim 64. Any other string means "full".
SIZE_PRESETS: dict[str, tuple[int, int, int]] = {
    "quarter": (256, 4, 12),
    "half": (512, 8, 12),
    "full": (1024, 16, 12),
    "double": (1024, 16, 24),
}
STOP_TOKEN = 1024  # = n_audio_tokens (spec 2.1)
SUPPORTED_ARCHS = ("llama", "retnet")
SUPPORTED_VERSIONS = (2, 3, 5)  # 1 cannot be built by the reference, 4 has integer nn.Parameters (spec 1.5)


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


@dataclass
class Experimental:
    """The reference's `ModelExperimentalSettings` (spec 1.4), same names and defaults."""

    hf: bool = False
    interleave: bool = False
    split_classifiers: bool = False
    audio_embedding_sums: bool = False
    audio_embedding_mode: str | None = None
    kv_heads: int = 0
    p_rvq_levels: str | list[int] = "auto"
    rvq_level_range: list[int] = field(default_factory=list)
    unified_position_ids: bool = True
    tie_classifier_to_embedding: bool = False
    token_dropout_error: float = 0.0
    token_dropout_rate: float = 0.0
    token_dropout_rvq_levels: list[int] = field(default_factory=lambda: [1, 8])
    causal_size: int = 1
    p_len_train: float = 0.05


@dataclass
class ModelConfig:
    """One model: the reference `Model` fields (spec 1.1) followed by valle_jax's own fields."""

    # --- reference fields ---
    name: str = "ar+nar"
    version: int = 5
    size: str | dict | float = "full"
    resp_levels: int = 8
    tasks: int = 8
    langs: int = 1
    tones: int = 1
    experts: int = 1
    arch_type: str = "llama"
    training: bool = True
    frozen_params: list[str] = field(default_factory=list)
    attention: str = "auto"
    dropout: float = 0.1
    loss_factors: dict[str, float] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=lambda: ["ar", "nar"])
    experimental: Experimental = field(default_factory=Experimental)
    # --- valle_jax fields: explicit sizes (None = from `size`, spec 1.2) ---
    dim: int | None = None
    heads: int | None = None
    layers: int | None = None
    ffn: int | None = None
    text_tokens: int = 256
    audio_tokens: int = 1024
    # Unused tables the reference keeps in every checkpoint (kept so export is lossless).
    embed_tokens: bool = True  # `model.embed_tokens` of HF LlamaModel
    dropout_token: bool = True  # absent from old (retnet era) checkpoints
    # --- front end and codec (the reference keeps these outside `Model`) ---
    tokenizer: str = "bpe"  # "bpe" (tokenizer.json, llama releases) or "naive" (the retnet release)
    codec: str = "vocos"  # "encodec" | "vocos" (EnCodec codes, Vocos decoder: the default) | "dac"
    # --- numerics ---
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_impl: str = "xla"  # "xla" everywhere; "cudnn" = flash attention on NVIDIA GPUs
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # --- RetNet (spec reference-retnet.md) ---
    retnet_layernorm_eps: float = 1e-5
    retnet_group_norm_eps: float = 1e-5
    retnet_group_norm: str = "layernorm"  # see models/retnet.py
    retnet_chunk_size: int = 512
    retnet_mode: str = "chunkwise"  # the reference's inference path; "parallel" is how it trained

    def __hash__(self) -> int:
        # Lets a config be a static argument of jax.jit (compiled programs are reused across call sites).
        import json

        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    # ----- derived (spec 1.2, 1.3) -----
    @property
    def preset(self) -> tuple[int, int, int]:
        # A dict or float size is ignored by the reference at this commit (spec 1.2): "full".
        return SIZE_PRESETS.get(self.size, SIZE_PRESETS["full"]) if isinstance(self.size, str) else SIZE_PRESETS["full"]

    @property
    def d_model(self) -> int:
        return self.dim if self.dim is not None else self.preset[0]

    @property
    def n_heads(self) -> int:
        return self.heads if self.heads is not None else self.preset[1]

    @property
    def n_layers(self) -> int:
        return self.layers if self.layers is not None else self.preset[2]

    @property
    def ffn_dim(self) -> int:
        return self.ffn if self.ffn is not None else 4 * self.d_model

    # RetNet layout flags, derived from `version` as the reference does (reference-retnet.md 1a, 4c item 9):
    # version < 3 is the compat layout of ar+nar-retnet-8, version >= 3 the torchscale 0.3.0 layout.
    @property
    def retnet_use_layernorm(self) -> bool:
        return self.version < 3  # LayerNorm with bias; else RMSNorm (weight only)

    @property
    def retnet_use_biases(self) -> bool:
        return self.version < 3  # biases on q/k/v/g/out and the FFN

    @property
    def retnet_use_glu(self) -> bool:
        return self.version >= 3  # GLU FFN (fc1, gate, fc2); else fc1 -> GELU -> ffn_layernorm -> fc2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        kv = self.experimental.kv_heads
        return kv if kv and kv > 0 else self.n_heads

    @property
    def causal(self) -> bool:
        return "ar" in self.capabilities or "len" in self.capabilities

    @property
    def has_nar(self) -> bool:
        return "nar" in self.capabilities

    @property
    def causal_size(self) -> int:
        return self.experimental.causal_size

    @property
    def stop_token(self) -> int:
        return self.audio_tokens

    @property
    def n_resp_tokens(self) -> int:
        """Width of the single head and of `model.embed_tokens` (spec 1.3)."""
        if "len" in self.capabilities:
            return self.audio_tokens
        if not self.has_nar:
            return self.audio_tokens + 1
        return self.audio_tokens + (1 if self.causal_size > 0 else 0)

    @property
    def l_tokens(self) -> list[int]:
        """Rows of each resps table / width of each split head (spec 1.3)."""
        if "len" in self.capabilities:
            return [self.audio_tokens] * self.resp_levels
        if not self.has_nar:
            return [self.audio_tokens + 1] * self.resp_levels
        return [self.n_resp_tokens] + [self.audio_tokens] * (self.resp_levels - 1)

    @property
    def max_levels(self) -> int:
        rng = self.experimental.rvq_level_range
        return rng[-1] if rng else self.resp_levels

    @property
    def training_levels(self) -> list[int]:
        """The multiset the reference draws one target level per training item from (spec 5.1): "auto" and
        "equal" both give level i (hi + 1 - i) times over [lo, hi] ("equal" is broken upstream and behaves like
        "auto"); lo = 0 for a causal model, else 1, or `rvq_level_range`. An explicit list is used as is."""
        p = self.experimental.p_rvq_levels
        if isinstance(p, (list, tuple)):
            return [int(x) for x in p]
        rng = self.experimental.rvq_level_range
        lo, hi = (rng[0], rng[1]) if rng else ((0 if self.causal else 1), self.resp_levels - 1)
        return [i for i in range(lo, hi + 1) for _ in range(hi + 1 - i)]

    @property
    def has_rvq_token(self) -> bool:
        return self.version >= 5 and not self.experimental.interleave

    @property
    def head_widths(self) -> list[int]:
        return self.l_tokens if self.experimental.split_classifiers else [self.n_resp_tokens]

    # ----- checks -----
    def validate(self) -> "ModelConfig":
        def bad(name: str, value: Any, expected: str) -> ConfigError:
            return ConfigError(f"model.{name} = {value!r}: expected {expected}")

        if self.arch_type not in SUPPORTED_ARCHS:
            raise bad("arch_type", self.arch_type, f"one of {SUPPORTED_ARCHS} (other backbones are not ported)")
        if self.version not in SUPPORTED_VERSIONS:
            raise bad("version", self.version, f"one of {SUPPORTED_VERSIONS} (spec 1.5: v1 and v4 cannot be built)")
        for cap in self.capabilities:
            if cap not in ("ar", "nar", "len", "lang", "tone"):
                raise bad("capabilities", self.capabilities, "a subset of ar, nar, len, lang, tone")
        for cap in ("len", "lang", "tone"):
            if cap in self.capabilities:
                raise bad("capabilities", self.capabilities, f"no '{cap}' (not used by any released model; not ported)")
        if not ({"ar", "nar"} & set(self.capabilities)):
            raise bad("capabilities", self.capabilities, "at least one of ar, nar")
        if self.experts != 1:
            raise bad("experts", self.experts, "1 (MoE is not ported)")
        if self.experimental.hf or self.experimental.interleave:
            raise bad("experimental.hf/interleave", True, "False (not used by released weights; not ported)")
        if self.experimental.audio_embedding_mode not in (None, ""):
            raise bad("experimental.audio_embedding_mode", self.experimental.audio_embedding_mode, "unset")
        if self.resp_levels < 1:
            raise bad("resp_levels", self.resp_levels, ">= 1")
        if self.d_model % self.n_heads:
            raise bad("heads", self.n_heads, f"a divisor of dim {self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise bad("experimental.kv_heads", self.n_kv_heads, f"a divisor of heads {self.n_heads}")
        if self.head_dim % 2:
            raise bad("heads", self.n_heads, f"a head_dim (dim/heads) that is even, got {self.head_dim}")
        if self.attention_impl not in ("xla", "cudnn"):
            raise bad("attention_impl", self.attention_impl, "'xla' or 'cudnn'")
        if self.causal_size < 1:
            raise bad("experimental.causal_size", self.causal_size, ">= 1")
        if self.tokenizer not in ("bpe", "naive"):
            raise bad("tokenizer", self.tokenizer, "'bpe' or 'naive'")
        if self.codec not in ("encodec", "vocos", "dac"):
            raise bad("codec", self.codec, "'encodec', 'vocos' or 'dac'")
        if self.retnet_mode not in ("parallel", "chunkwise", "recurrent"):
            raise bad("retnet_mode", self.retnet_mode, "parallel, chunkwise or recurrent")
        return self

    # ----- (de)serialisation -----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def reference_dict(self) -> dict:
        """Only the reference `Model` fields (what its export writes as `config` metadata)."""
        ours = {f.name for f in fields(ModelConfig)} - REFERENCE_MODEL_FIELDS
        return {k: v for k, v in self.to_dict().items() if k not in ours}

    @classmethod
    def from_dict(cls, data: dict, *, strict: bool = True, where: str = "model") -> "ModelConfig":
        data = dict(data)
        exp = data.pop("experimental", None) or {}
        if not isinstance(exp, dict):
            raise ConfigError(f"{where}.experimental = {exp!r}: expected a mapping")
        known = {f.name for f in fields(cls)}
        known_exp = {f.name for f in fields(Experimental)}
        unknown = sorted(set(data) - known) + [f"experimental.{k}" for k in sorted(set(exp) - known_exp)]
        if unknown:
            msg = f"{where}: unknown field(s) {', '.join(unknown)}"
            if strict:
                raise ConfigError(msg)
            warnings.warn(msg + " (ignored; a checkpoint with them may follow newer reference rules)", stacklevel=2)
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.experimental = Experimental(**{k: v for k, v in exp.items() if k in known_exp})
        return cfg

    @classmethod
    def from_reference(cls, entry: dict, *, where: str = "reference config") -> "ModelConfig":
        """One entry of the reference YAML's `models:` list, cleaned as `Config.format` does (spec 1.1)."""
        entry = dict(entry)
        for legacy in ("prom_levels", "interleave"):
            entry.pop(legacy, None)
        exp = dict(entry.get("experimental") or {})
        if "audio_embedding_sums" in entry:
            exp["audio_embedding_sums"] = entry.pop("audio_embedding_sums")
        entry["experimental"] = exp
        return cls.from_dict(entry, strict=False, where=where)

    def override(self, assignments: list[str] | dict[str, Any]) -> "ModelConfig":
        """Apply `key=value` overrides (dotted keys; values parsed as YAML). Unknown keys are refused."""
        items = assignments.items() if isinstance(assignments, dict) else (_split_assignment(a) for a in assignments)
        data = self.to_dict()
        for key, value in items:
            _assign(data, key, key.removeprefix("model.").split("."), value)
        return ModelConfig.from_dict(data)


REFERENCE_MODEL_FIELDS = {
    "name", "version", "size", "resp_levels", "tasks", "langs", "tones", "experts", "arch_type", "training",
    "frozen_params", "attention", "dropout", "loss_factors", "capabilities", "experimental",
}  # fmt: skip


def _assign(data: dict, key: str, parts: list[str], value: Any) -> None:
    """data[parts[0]]...[parts[-1]] = value, refusing unknown fields (`key` names the override in errors)."""
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a config section")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"override {key!r}: unknown field {parts[-1]!r}")
    node[parts[-1]] = value


def _split_assignment(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_yaml(path: str | Path) -> ModelConfig:
    """Our YAML (`model:` block) or a reference YAML (`models:` list; the first `training` entry)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if "model" in data:
        return ModelConfig.from_dict(data["model"], where=f"{path}: model").validate()
    if "models" in data:
        return load_reference_yaml(path, data=data)
    raise ConfigError(f"{path}: no 'model' block (valle_jax) or 'models' list (reference YAML)")


def load_reference_yaml(path: str | Path, name: str | None = None, data: dict | None = None) -> ModelConfig:
    """Read the reference's own YAML: pick the `models:` entry named `name` (default: the first one)."""
    path = Path(path)
    data = data if data is not None else yaml.safe_load(path.read_text())
    models = data.get("models") or []
    if not models:
        raise ConfigError(f"{path}: 'models' list is empty")
    entry = next((m for m in models if name is None or m.get("name") == name), None)
    if entry is None:
        raise ConfigError(f"{path}: no model named {name!r} in 'models' ({[m.get('name') for m in models]})")
    if "audio_embedding_sums" in data:  # top-level legacy key, moved into experimental by Config.format
        entry = {**entry, "audio_embedding_sums": data["audio_embedding_sums"]}
    return ModelConfig.from_reference(entry, where=f"{path}: models[{entry.get('name')}]").validate()


def save_yaml(cfg: ModelConfig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({"model": cfg.to_dict()}, sort_keys=False))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------
# Training run: data, mesh, optimisation. A run YAML has `model:`, `data:`, `train:` and `mesh:` blocks.

DEFAULT_AXIS_RULES: list[list[Any]] = [
    # logical axis -> mesh axis (or list of mesh axes / None = replicated). One table, changed by config only.
    ["batch", ["data", "fsdp"]],
    ["embed", "fsdp"],
    ["vocab", "tensor"],
    ["mlp", "tensor"],
    ["q_heads", "tensor"],
    ["kv_heads", "tensor"],
    ["heads", "tensor"],
    ["kv", None],
    ["table", None],
    ["norm", None],
    ["length", None],
]


@dataclass
class MeshConfig:
    """One named mesh (data, fsdp, tensor); -1 = fill with the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    axis_rules: list[list[Any]] = field(default_factory=lambda: [list(r) for r in DEFAULT_AXIS_RULES])


@dataclass
class DataConfig:
    """A prepared dataset (python -m valle_jax.prepare) and how batches are drawn from it."""

    path: str = "data/demo"  # directory with the shards and metadata written by `prepare`
    eval_path: str | None = None  # default: the held-out split inside `path`
    batch_tokens: int = 8192  # token budget per batch (rows of the assembled sequences, padding included)
    max_batch: int = 64
    length_buckets: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])  # static sequence lengths
    prompt_duration_range: list[float] = field(default_factory=lambda: [3.0, 6.0])  # seconds (spec 8.5)
    max_prompts: int = 1
    frames_per_second: int = 75
    min_duration: float = 0.5  # seconds of audio
    max_duration: float = 20.0
    seed: int = 0
    num_workers: int = 0  # grain worker processes (0 = in-process)
    batch_multiple: int = 1  # global batch sizes are multiples of lcm(this, process count), e.g. the data-parallel size


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0
    init_from: str | None = None  # a model directory or a reference .sft/.pth to fine-tune from
    optimizer: str = "adamw"  # "adamw" | "prodigy"
    learning_rate: float = 1e-4
    schedule: str = "cosine"  # "cosine" | "constant"
    warmup_steps: int = 100
    end_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    grad_accum: int = 1
    remat: str = "none"  # "none" | "full" | "dots" (jax.checkpoint policies by name)
    compute_dtype: str = "bfloat16"  # model compute dtype on accelerators; float32 master weights
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 4
    eval_samples: int = 2  # utterances synthesized at each eval and written under run_dir/samples
    save_every: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 5  # stop after this many NaN/inf steps in a row
    export_dtype: str = "bfloat16"
    coordinator_address: str | None = None  # jax.distributed: explicit multi-process start
    num_processes: int | None = None
    process_id: int | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "Config":
        unknown = sorted(set(data) - {"model", "data", "train", "mesh"})
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)} (expected model, data, train, mesh)")
        out = cls(model=ModelConfig.from_dict(data.get("model") or {}, where=f"{where}: model"))
        for name, klass in (("data", DataConfig), ("train", TrainConfig), ("mesh", MeshConfig)):
            block = data.get(name) or {}
            known = {f.name for f in fields(klass)}
            bad = sorted(set(block) - known)
            if bad:
                raise ConfigError(f"{where}: {name}: unknown field(s) {', '.join(bad)}")
            setattr(out, name, klass(**block))
        out.model.validate()
        return out

    def override(self, assignments: list[str]) -> "Config":
        """`section.key=value` (section one of model/data/train/mesh; a bare key means model.key)."""
        data = self.to_dict()
        for text in assignments:
            key, value = _split_assignment(text)
            parts = key.split(".")
            _assign(data, key, parts if parts[0] in data else ["model"] + parts, value)
        return Config.from_dict(data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """A run YAML (model/data/train/mesh blocks) plus `key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    cfg = Config.from_dict(data, where=str(path))
    return cfg.override(overrides or [])


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
