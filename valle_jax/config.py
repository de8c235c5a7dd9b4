"""Typed, frozen configuration: the reference's `Model` fields, our numerics, the run blocks, YAML load/save.

Precedence (DESIGN.md): checkpoint (key shapes, `.sft` metadata) < YAML < CLI `key=value` overrides.
Field names of `ModelConfig` and `Experimental` are the reference's own (spec section 1), so a block of the
reference's YAML `models:` list loads as is; the fields after them are ours (explicit sizes, numerics).

Every config is a frozen dataclass: lists become tuples and mappings `FrozenMap`s, so a config is hashable (a
static argument of `jax.jit`) and never changes under a compiled program; `dataclasses.replace` or
`override` make a new one. Each class validates itself on construction (`__post_init__`): a bad value raises
`ConfigError` naming the field, the value and what is allowed. Closed choices are enums (`AttentionImpl`,
`CodecKind`, ...); the backbone is open: any name registered in `models.backbone`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import yaml

from valle_jax.codec.specs import CODEC_SPECS, CodecKind, codec_spec
from valle_jax.fileio import atomic_write_text

# Spec 1.2: (dim, heads, layers); FFN is 4 * dim, head_dim 64. Any other string means "full".
SIZE_PRESETS: dict[str, tuple[int, int, int]] = {
    "quarter": (256, 4, 12),
    "half": (512, 8, 12),
    "full": (1024, 16, 12),
    "double": (1024, 16, 24),
}
STOP_TOKEN = 1024  # = audio_tokens of every released model (spec 2.1); `ModelConfig.stop_token` in general
SUPPORTED_VERSIONS = (2, 3, 5)  # 1 cannot be built by the reference, 4 has integer nn.Parameters (spec 1.5)
CAPABILITIES = ("ar", "nar", "len", "lang", "tone")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


class Choice(str, enum.Enum):
    """A closed choice: compares equal to its string value, prints as it."""

    def __str__(self) -> str:
        return self.value


class AttentionImpl(Choice):
    AUTO = "auto"  # decided per platform by `runtime_config` (`resolve_attention`)
    XLA = "xla"  # everywhere; the only path that can drop attention probabilities
    CUDNN = "cudnn"  # cuDNN flash attention on NVIDIA GPUs (fp16/bf16)
    SPLASH = "splash"  # Pallas splash attention on TPU (jax.experimental.pallas.ops.tpu; interpret mode elsewhere)


FUSED_ATTENTION = (AttentionImpl.CUDNN, AttentionImpl.SPLASH)  # kernels that cannot apply attention dropout


class TokenizerKind(Choice):
    BPE = "bpe"  # tokenizer.json (llama releases)
    NAIVE = "naive"  # the retnet release


class RetNetMode(Choice):
    PARALLEL = "parallel"  # how the reference trained
    CHUNKWISE = "chunkwise"  # the reference's inference path
    RECURRENT = "recurrent"


class GroupNorm(Choice):
    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"


class Optimizer(Choice):
    ADAMW = "adamw"
    PRODIGY = "prodigy"


class Schedule(Choice):
    COSINE = "cosine"
    CONSTANT = "constant"


class Restore(Choice):
    ALL = "all"  # resume: params, optimizer state, counters, data position
    PARAMS = "params"  # the checkpoint's params (and step, data position) with a fresh optimizer state


class FrozenMap(Mapping):
    """A read-only, hashable mapping (a config's dict-valued fields)."""

    def __init__(self, data: Mapping | None = None):
        self._data = dict(data or {})

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(sorted((str(k), _hashable(v)) for k, v in self._data.items())))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self._data) == dict(other)

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


def _hashable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return FrozenMap({k: _hashable(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    return v


def plain(obj: Any) -> Any:
    """Config values -> plain YAML/JSON values (enums to strings, tuples to lists, maps to dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _bad(where: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{where} = {value!r}: expected {expected}")


def _choice(owner: Any, name: str, enum_cls: type[Choice], where: str) -> None:
    """Coerce field `name` of a frozen dataclass to `enum_cls`, naming the field and the allowed values."""
    value = getattr(owner, name)
    try:
        object.__setattr__(owner, name, enum_cls(str(value.value if isinstance(value, enum.Enum) else value)))
    except ValueError:
        raise _bad(f"{where}.{name}", value, "one of " + ", ".join(e.value for e in enum_cls)) from None


def _freeze(owner: Any) -> None:
    """Lists -> tuples and dicts -> FrozenMaps, in place on a frozen dataclass being constructed."""
    for f in fields(owner):
        v = getattr(owner, f.name)
        if isinstance(v, (list, tuple, Mapping)) and not isinstance(v, FrozenMap):
            object.__setattr__(owner, f.name, _hashable(v))


def _number(owner: Any, name: str, where: str, *, kind: type = float, lo: float | None = None,
            lo_open: bool = False, hi: float | None = None, optional: bool = False) -> None:  # fmt: skip
    """Check a numeric field: its type (bools are not numbers), finiteness and range."""
    value = getattr(owner, name)
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if not ok or not math.isfinite(value):
        raise _bad(f"{where}.{name}", value, "an integer" if kind is int else "a finite number")
    if kind is int:
        object.__setattr__(owner, name, int(value))
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _bad(f"{where}.{name}", value, f"{'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise _bad(f"{where}.{name}", value, f"<= {hi}")


# ---------------------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class Experimental:
    """The reference's `ModelExperimentalSettings` (spec 1.4), same names and defaults."""

    hf: bool = False
    interleave: bool = False
    split_classifiers: bool = False
    audio_embedding_sums: bool = False
    audio_embedding_mode: str | None = None
    kv_heads: int = 0
    p_rvq_levels: str | tuple[int, ...] = "auto"
    rvq_level_range: tuple[int, ...] = ()
    unified_position_ids: bool = True
    tie_classifier_to_embedding: bool = False
    token_dropout_error: float = 0.0
    token_dropout_rate: float = 0.0
    token_dropout_rvq_levels: tuple[int, ...] = (1, 8)
    causal_size: int = 1
    p_len_train: float = 0.05

    def __post_init__(self):
        _freeze(self)
        w = "model.experimental"
        if self.hf or self.interleave:
            raise _bad(f"{w}.hf/interleave", True, "False (not used by released weights; not ported)")
        if self.audio_embedding_mode not in (None, ""):
            raise _bad(f"{w}.audio_embedding_mode", self.audio_embedding_mode, "unset")
        _number(self, "causal_size", w, kind=int, lo=1)
        _number(self, "kv_heads", w, kind=int, lo=0)
        if not (self.p_rvq_levels in ("auto", "equal") or isinstance(self.p_rvq_levels, tuple)):
            raise _bad(f"{w}.p_rvq_levels", self.p_rvq_levels, "'auto', 'equal' or a list of levels")
        if self.rvq_level_range and len(self.rvq_level_range) != 2:
            raise _bad(f"{w}.rvq_level_range", list(self.rvq_level_range), "[] or [lowest, highest]")
        for name in ("token_dropout_rate", "token_dropout_error", "p_len_train"):
            _number(self, name, w, lo=0.0, hi=1.0)
        r = self.token_dropout_rvq_levels
        if r and (len(r) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in r)):
            raise _bad(f"{w}.token_dropout_rvq_levels", list(r), "[] or [lowest, highest] levels")


@dataclass(frozen=True)
class ModelConfig:
    """One model: the reference `Model` fields (spec 1.1) followed by valle_jax's own fields."""

    # --- reference fields ---
    name: str = "ar+nar"
    version: int = 5
    size: str | FrozenMap | float = "full"
    resp_levels: int = 8
    tasks: int = 8
    langs: int = 1
    tones: int = 1
    experts: int = 1
    arch_type: str = "llama"  # a backbone registered in models.backbone (llama, retnet, ...)
    training: bool = True
    frozen_params: tuple[str, ...] = ()
    attention: str = "auto"
    dropout: float = 0.1
    loss_factors: FrozenMap = field(default_factory=FrozenMap)
    capabilities: tuple[str, ...] = ("ar", "nar")
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
    # --- front end and codec the model was trained with (the reference keeps these outside `Model`) ---
    tokenizer: TokenizerKind = TokenizerKind.BPE
    codec: CodecKind = CodecKind.VOCOS  # EnCodec codes decoded by Vocos: the reference's default
    # --- numerics ---
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # --- runtime choices (how to run it, not what it is): set by `runtime_config` ---
    attention_impl: AttentionImpl = AttentionImpl.AUTO
    # Attention-probability dropout in training. None: the reference's `dropout` on the XLA path, 0 on a fused
    # kernel (cuDNN/splash cannot drop probabilities; `runtime_config` says so at start). An explicit value > 0
    # keeps `attention_impl: auto` on XLA and is refused together with an explicit fused kernel.
    attention_dropout: float | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # activation checkpointing of each decoder layer, by policy name (models.backbone)
    # The platform the model is compiled for (cpu, gpu, cuda, rocm, tpu; "" = that of JAX's first device), set by
    # `runtime_config`: a TPU program compiled ahead of time on a CPU host must get the TPU forms (see
    # `kernel_interpret`, `cpu_layouts`), not those of the host.
    platform: str = ""
    # --- RetNet (spec reference-retnet.md) ---
    retnet_layernorm_eps: float = 1e-5
    retnet_group_norm_eps: float = 1e-5
    retnet_group_norm: GroupNorm = GroupNorm.LAYERNORM  # see models/retnet.py
    retnet_chunk_size: int = 512
    retnet_mode: RetNetMode = RetNetMode.CHUNKWISE  # the reference's inference path; "parallel" is how it trained

    def __post_init__(self):
        _freeze(self)
        w = "model"
        if isinstance(self.experimental, Mapping):
            object.__setattr__(self, "experimental", Experimental(**self.experimental))
        for name, cls in (("tokenizer", TokenizerKind), ("codec", CodecKind), ("attention_impl", AttentionImpl),
                          ("retnet_group_norm", GroupNorm), ("retnet_mode", RetNetMode)):  # fmt: skip
            _choice(self, name, cls, w)
        from valle_jax.models import backbone  # import-light: names only, no flax

        if self.arch_type not in backbone.names():
            raise _bad(f"{w}.arch_type", self.arch_type, "a registered backbone: " + ", ".join(backbone.names()))
        if self.version not in SUPPORTED_VERSIONS:
            raise _bad(f"{w}.version", self.version, f"one of {SUPPORTED_VERSIONS} (spec 1.5: v1 and v4 cannot be built)")
        unknown = [c for c in self.capabilities if c not in CAPABILITIES]
        if unknown:
            raise _bad(f"{w}.capabilities", list(self.capabilities), "a subset of " + ", ".join(CAPABILITIES))
        for cap in ("len", "lang", "tone"):
            if cap in self.capabilities:
                raise _bad(f"{w}.capabilities", list(self.capabilities), f"no '{cap}' (no released model uses it; not ported)")
        if not ({"ar", "nar"} & set(self.capabilities)):
            raise _bad(f"{w}.capabilities", list(self.capabilities), "at least one of ar, nar")
        if self.experts != 1:
            raise _bad(f"{w}.experts", self.experts, "1 (MoE is not ported)")
        for name in ("resp_levels", "text_tokens", "audio_tokens"):
            _number(self, name, w, kind=int, lo=1)
        for name in ("dim", "heads", "layers", "ffn"):
            _number(self, name, w, kind=int, lo=1, optional=True)
        for name in ("tasks", "langs", "tones", "version"):
            _number(self, name, w, kind=int, lo=0)
        _number(self, "dropout", w, lo=0.0, hi=1.0)
        _number(self, "attention_dropout", w, lo=0.0, hi=1.0, optional=True)
        if self.attention_impl in FUSED_ATTENTION and (self.attention_dropout or 0.0) > 0.0:
            raise _bad(f"{w}.attention_dropout", self.attention_dropout,
                       f"0 with attention_impl={self.attention_impl} (a fused kernel cannot drop attention "
                       "probabilities): set model.attention_dropout=0 to train on the fused kernel, or "
                       "model.attention_impl=xla (or auto) to keep attention dropout")  # fmt: skip
        _number(self, "retnet_chunk_size", w, kind=int, lo=1)
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise _bad(f"{w}.{name}", getattr(self, name), "one of " + ", ".join(DTYPES))
        if self.remat not in backbone.REMAT_POLICIES:
            raise _bad(f"{w}.remat", self.remat, "one of " + ", ".join(backbone.REMAT_POLICIES))
        if self.d_model % self.n_heads:
            raise _bad(f"{w}.heads", self.n_heads, f"a divisor of dim {self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise _bad(f"{w}.experimental.kv_heads", self.n_kv_heads, f"a divisor of heads {self.n_heads}")
        if self.head_dim % 2:
            raise _bad(f"{w}.heads", self.n_heads, f"a head_dim (dim/heads) that is even, got {self.head_dim}")
        for key, value in self.loss_factors.items():
            if key not in ("text", "prom", "resp"):
                raise _bad(f"{w}.loss_factors", dict(self.loss_factors), "keys among text, prom, resp")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise _bad(f"{w}.loss_factors.{key}", value, "a finite number")

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

    def _compiled_for(self) -> str:
        if self.platform:
            return self.platform
        import jax

        return device_platform(jax.devices()[0])

    @property
    def kernel_interpret(self) -> bool:
        """Pallas kernels (splash) run in interpret mode: the model is compiled for a platform other than TPU."""
        return self._compiled_for() != "tpu"

    @property
    def cpu_layouts(self) -> bool:
        """Layouts for XLA's CPU backend, the same numbers: Dense layers multiply over the rows flattened to 2-d
        (models.backbone.rows_dot_general) and XLA attention puts the heads ahead of the rows (llama.attend_xla).
        On CPU only: together they made the quarter-shape training step about 2x faster there; on TPU the 2-d
        Dense form added HBM traffic (the v5e AOT cost analysis: 106 -> 112 GB/step)."""
        return self._compiled_for() == "cpu"

    @property
    def attention_dropout_rate(self) -> float:
        """The attention dropout applied in training (see `attention_dropout`)."""
        if self.attention_dropout is not None:
            return float(self.attention_dropout)
        return 0.0 if self.attention_impl in FUSED_ATTENTION else float(self.dropout)

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
        if isinstance(p, tuple):
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

    @property
    def codec_spec(self):
        return codec_spec(self.codec)

    # ----- (de)serialisation -----
    def to_dict(self) -> dict:
        return plain(self)

    def reference_dict(self) -> dict:
        """Only the reference `Model` fields (what its export writes as `config` metadata)."""
        return {k: v for k, v in self.to_dict().items() if k in REFERENCE_MODEL_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping, *, strict: bool = True, where: str = "model") -> "ModelConfig":
        data = dict(data)
        exp = data.pop("experimental", None) or {}
        if not isinstance(exp, Mapping):
            raise ConfigError(f"{where}.experimental = {exp!r}: expected a mapping")
        known = {f.name for f in fields(cls)}
        known_exp = {f.name for f in fields(Experimental)}
        unknown = sorted(set(data) - known) + [f"experimental.{k}" for k in sorted(set(exp) - known_exp)]
        if unknown:
            msg = f"{where}: unknown field(s) {', '.join(unknown)}"
            if strict:
                raise ConfigError(msg)
            warnings.warn(msg + " (ignored; a checkpoint with them may follow newer reference rules)", stacklevel=2)
        try:
            experimental = Experimental(**{k: v for k, v in exp.items() if k in known_exp})
            return cls(**{k: v for k, v in data.items() if k in known}, experimental=experimental)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}" if where != "model" else str(e)) from None

    @staticmethod
    def clean_reference(entry: Mapping) -> dict:
        """One entry of the reference YAML's `models:` list as `Config.format` cleans it (spec 1.1): legacy keys
        dropped, a top-level `audio_embedding_sums` moved into `experimental`."""
        entry = dict(entry)
        for legacy in ("prom_levels", "interleave"):
            entry.pop(legacy, None)
        exp = dict(entry.get("experimental") or {})
        if "audio_embedding_sums" in entry:
            exp["audio_embedding_sums"] = entry.pop("audio_embedding_sums")
        entry["experimental"] = exp
        return entry

    @classmethod
    def from_reference(cls, entry: Mapping, *, where: str = "reference config") -> "ModelConfig":
        """One entry of the reference YAML's `models:` list (unknown fields are warned about, not refused)."""
        return cls.from_dict(cls.clean_reference(entry), strict=False, where=where)

    def override(self, assignments: list[str] | Mapping[str, Any]) -> "ModelConfig":
        """A new config with `key=value` overrides (dotted keys; values parsed as YAML). Unknown keys are refused."""
        items = assignments.items() if isinstance(assignments, Mapping) else (parse_assignment(a) for a in assignments)
        data = self.to_dict()
        for key, value in items:
            _assign(data, key, key.removeprefix("model.").split("."), value)
        return ModelConfig.from_dict(data)


REFERENCE_MODEL_FIELDS = {
    "name", "version", "size", "resp_levels", "tasks", "langs", "tones", "experts", "arch_type", "training",
    "frozen_params", "attention", "dropout", "loss_factors", "capabilities", "experimental",
}  # fmt: skip


def compute_dtype(requested: str = "auto") -> str:
    """The compute dtype: "auto" is float32 on CPU (exact, and what parity needs) and bfloat16 on accelerators."""
    if requested != "auto":
        if requested not in DTYPES:
            raise _bad("dtype", requested, "auto or one of " + ", ".join(DTYPES))
        return requested
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def resolve_attention(impl: str, dtype: str, platform: str, attention_dropout: float | None) -> AttentionImpl:
    """The attention path `auto` stands for on `platform` (cpu, gpu/cuda = NVIDIA, rocm = AMD, tpu; see
    `device_platform`) at compute `dtype`: cuDNN flash attention on NVIDIA GPUs in bfloat16/float16, Pallas splash
    attention on TPU, XLA elsewhere and whenever an explicit `attention_dropout` > 0 asks for dropout (only XLA can
    apply it). An explicit choice is kept."""
    impl = AttentionImpl(str(impl))
    if impl != AttentionImpl.AUTO:
        return impl
    if attention_dropout is not None and attention_dropout > 0:
        return AttentionImpl.XLA
    if platform in ("gpu", "cuda") and dtype in ("bfloat16", "float16"):
        return AttentionImpl.CUDNN
    if platform == "tpu":
        return AttentionImpl.SPLASH
    return AttentionImpl.XLA


def describe_attention(cfg: ModelConfig) -> str:
    """One line for the start of a run: the attention path and the attention dropout it trains with."""
    rate = cfg.attention_dropout_rate
    line = f"attention {cfg.attention_impl}, attention dropout {rate:g}"
    if cfg.attention_impl in FUSED_ATTENTION and cfg.attention_dropout is None and cfg.dropout > 0:
        line += (f" (model.dropout = {cfg.dropout:g} is not applied: the fused {cfg.attention_impl} kernel cannot drop "
                 "attention probabilities; model.attention_impl=xla trains with it)")  # fmt: skip
    return line


def device_platform(device: Any) -> str:
    """A JAX device's platform as the runtime choices name it: "rocm" for AMD GPUs (JAX calls both vendors' GPUs
    "gpu", and cuDNN attention exists only on NVIDIA ones), else `device.platform` (cpu, gpu, tpu)."""
    platform = str(device.platform)
    version = str(getattr(getattr(device, "client", None), "platform_version", "") or "")
    return "rocm" if platform == "gpu" and "rocm" in version.lower() else platform


def runtime_config(cfg: ModelConfig, dtype: str = "auto", attention_impl: str | None = None,
                   remat: str | None = None, platform: str | None = None) -> ModelConfig:  # fmt: skip
    """The model as it will run here: compute dtype decided once (`compute_dtype`), the attention path (`auto`
    resolved for `platform`, default: that of JAX's first device, `device_platform`; `resolve_attention`), remat."""
    changes: dict[str, Any] = {"dtype": compute_dtype(dtype)}
    if remat is not None:
        changes["remat"] = remat
    try:
        requested = AttentionImpl(str(attention_impl if attention_impl is not None else cfg.attention_impl))
    except ValueError:
        raise _bad("attention_impl", attention_impl, "one of " + ", ".join(e.value for e in AttentionImpl)) from None
    if platform is None:
        import jax

        platform = device_platform(jax.devices()[0])
    changes["attention_impl"] = resolve_attention(requested, changes["dtype"], platform, cfg.attention_dropout)
    changes["platform"] = platform
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


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


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_assignment(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e30 as a string
            value = float(value)
        return key.strip(), value
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e


def load_yaml(path: str | Path) -> ModelConfig:
    """Our YAML (`model:` block) or a reference YAML (`models:` list; the first `training` entry)."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if "model" in data:
        return ModelConfig.from_dict(data["model"], where=f"{path}: model")
    if "models" in data:
        return load_reference_yaml(path, data=data)
    raise ConfigError(f"{path}: no 'model' block (valle_jax) or 'models' list (reference YAML)")


def load_reference_yaml(path: str | Path, name: str | None = None, data: dict | None = None) -> ModelConfig:
    """Read the reference's own YAML: pick the `models:` entry named `name` (default: the first one)."""
    path = Path(path)
    data = data if data is not None else _read_yaml(path)
    models = data.get("models") or []
    if not models:
        raise ConfigError(f"{path}: 'models' list is empty")
    entry = next((m for m in models if name is None or m.get("name") == name), None)
    if entry is None:
        raise ConfigError(f"{path}: no model named {name!r} in 'models' ({[m.get('name') for m in models]})")
    if "audio_embedding_sums" in data:  # top-level legacy key, moved into experimental by Config.format
        entry = {**entry, "audio_embedding_sums": data["audio_embedding_sums"]}
    return ModelConfig.from_reference(entry, where=f"{path}: models[{entry.get('name')}]")


def save_yaml(cfg: ModelConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump({"model": cfg.to_dict()}, sort_keys=False))


# ---------------------------------------------------------------------------------------------------------
# Training run: data, mesh, optimisation. A run YAML has `model:`, `data:`, `train:` and `mesh:` blocks.

DEFAULT_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # logical axis -> mesh axis (or list of mesh axes / None = replicated). One table, changed by config only.
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("table", None),
    ("table_embed", None),  # embedding tables' model dim: replicated (models/valle.py says why)
    ("norm", None),
    ("length", None),
)


@dataclass(frozen=True)
class MeshConfig:
    """One named mesh (data, fsdp, tensor); -1 = fill with the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    axis_rules: tuple[tuple[str, Any], ...] = DEFAULT_AXIS_RULES

    def __post_init__(self):
        _freeze(self)
        for name in ("data", "fsdp", "tensor"):
            _number(self, name, "mesh", kind=int, lo=-1)


@dataclass(frozen=True)
class DataConfig:
    """A prepared dataset (python -m valle_jax.prepare) and how batches are drawn from it."""

    path: str = "data/demo"  # directory with the shards and metadata written by `prepare`
    eval_path: str | None = None  # default: the held-out split inside `path`
    # token budget per global batch (rows of the assembled sequences, padding included); None: per platform,
    # data.batching.DEFAULT_BATCH_TOKENS per batch shard (CPU 8192, GPU 32768, TPU 16384)
    batch_tokens: int | None = None
    max_batch: int = 64
    length_buckets: tuple[int, ...] = (256, 512, 1024, 2048)  # static sequence lengths
    prompt_duration_range: tuple[float, ...] = (3.0, 6.0)  # seconds (spec 8.5)
    max_prompts: int = 1
    frames_per_second: float | None = None  # code frames per second: None = the dataset's own (dataset.json)
    min_duration: float = 0.5  # seconds of audio
    max_duration: float = 20.0
    seed: int = 0
    num_workers: int = 0  # grain worker processes (0 = in-process)
    batch_multiple: int = 1  # global batch sizes are multiples of lcm(this, process count), e.g. the data-parallel size

    def __post_init__(self):
        _freeze(self)
        w = "data"
        _number(self, "batch_tokens", w, kind=int, lo=1, optional=True)
        for name in ("max_batch", "batch_multiple"):
            _number(self, name, w, kind=int, lo=1)
        for name in ("max_prompts", "num_workers", "seed"):
            _number(self, name, w, kind=int, lo=0)
        _number(self, "frames_per_second", w, lo=0.0, lo_open=True, optional=True)
        if not self.length_buckets or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in self.length_buckets):
            raise _bad(f"{w}.length_buckets", list(self.length_buckets), "a non-empty list of positive integers")
        r = self.prompt_duration_range
        if len(r) != 2 or not all(isinstance(x, (int, float)) and 0 <= x for x in r) or r[0] > r[1]:
            raise _bad(f"{w}.prompt_duration_range", list(r), "[low, high] seconds with 0 <= low <= high")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0
    init_from: str | None = None  # a model directory or a reference .sft/.pth to fine-tune from
    optimizer: Optimizer = Optimizer.ADAMW
    learning_rate: float = 1e-4
    schedule: Schedule = Schedule.COSINE
    warmup_steps: int = 100
    end_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    grad_accum: int = 1
    remat: str = "none"  # "none" | "full" | "dots" | "dots_no_batch" (models.backbone.REMAT_POLICIES)
    compute_dtype: str = "auto"  # model compute dtype ("auto": float32 on CPU, bfloat16 on accelerators)
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 4
    eval_samples: int = 2  # utterances synthesized at each eval and written under run_dir/samples
    save_every: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 5  # stop after this many NaN/inf steps in a row
    restore: Restore = Restore.ALL  # what a run dir's newest usable checkpoint gives a resumed run
    restart: bool = False  # start over although the run dir holds checkpoints (they are moved aside, not deleted)
    eval_metrics: bool = False  # WER/CER and SIM-O of the eval samples (valle_jax.evaluate) into the logs
    export_dtype: str = "bfloat16"
    # LoRA fine-tuning (the reference's `loras:` entry; models.lora.LoraConfig, its defaults: rank 128, alpha 128,
    # dropout 0.1, embeddings false, rvq_levels []): only the LoRA (and the `*_emb` tables with embeddings: true)
    # trains, on the frozen base from `init_from`. None: full training (model.frozen_params then freezes by name).
    lora: Any = None
    coordinator_address: str | None = None  # jax.distributed: explicit multi-process start
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        w = "train"
        _choice(self, "optimizer", Optimizer, w)
        _choice(self, "schedule", Schedule, w)
        _choice(self, "restore", Restore, w)
        for name in ("restart", "eval_metrics"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(f"{w}.{name}", getattr(self, name), "true or false")
        for name in ("steps", "seed", "warmup_steps", "log_every", "eval_every", "eval_batches", "eval_samples",
                     "save_every", "keep_checkpoints"):  # fmt: skip
            _number(self, name, w, kind=int, lo=0)
        for name in ("grad_accum", "max_bad_steps"):
            _number(self, name, w, kind=int, lo=1)
        _number(self, "learning_rate", w, lo=0.0, lo_open=True)
        for name in ("end_learning_rate_fraction", "weight_decay", "grad_clip"):
            _number(self, name, w, lo=0.0)
        for name in ("b1", "b2"):
            _number(self, name, w, lo=0.0, hi=1.0)
        from valle_jax.models import backbone

        if self.remat not in backbone.REMAT_POLICIES:
            raise _bad(f"{w}.remat", self.remat, "one of " + ", ".join(backbone.REMAT_POLICIES))
        if self.compute_dtype != "auto" and self.compute_dtype not in DTYPES:
            raise _bad(f"{w}.compute_dtype", self.compute_dtype, "auto or one of " + ", ".join(DTYPES))
        if self.export_dtype not in DTYPES:
            raise _bad(f"{w}.export_dtype", self.export_dtype, "one of " + ", ".join(DTYPES))
        if self.lora is not None:
            from valle_jax.models.lora import LoraConfig, LoraError

            if not isinstance(self.lora, LoraConfig):
                if not isinstance(self.lora, Mapping):
                    raise _bad(f"{w}.lora", self.lora, "a mapping (rank, alpha, dropout, embeddings, rvq_levels) or null")
                known = {f.name for f in fields(LoraConfig)}
                bad = sorted(set(self.lora) - known)
                if bad:
                    raise ConfigError(f"{w}.lora: unknown field(s) {', '.join(bad)} (expected {', '.join(sorted(known))})")
                try:
                    object.__setattr__(self, "lora", LoraConfig.from_dict(dict(self.lora), where=f"{w}.lora"))
                except (LoraError, TypeError) as e:
                    raise ConfigError(str(e) if isinstance(e, LoraError) else f"{w}.lora = {dict(self.lora)!r}: {e}") from None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def to_dict(self) -> dict:
        return plain(self)

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "config") -> "Config":
        unknown = sorted(set(data) - {"model", "data", "train", "mesh"})
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)} (expected model, data, train, mesh)")
        blocks: dict[str, Any] = {"model": ModelConfig.from_dict(data.get("model") or {}, where=f"{where}: model")}
        for name, klass in (("data", DataConfig), ("train", TrainConfig), ("mesh", MeshConfig)):
            block = data.get(name) or {}
            if not isinstance(block, Mapping):
                raise ConfigError(f"{where}: {name}: expected a mapping, got {block!r}")
            known = {f.name for f in fields(klass)}
            bad = sorted(set(block) - known)
            if bad:
                raise ConfigError(f"{where}: {name}: unknown field(s) {', '.join(bad)}")
            try:
                blocks[name] = klass(**block)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        return cls(**blocks)

    def override(self, assignments: list[str]) -> "Config":
        """A new config with `section.key=value` overrides (section one of model/data/train/mesh; a bare key
        means model.key)."""
        data = self.to_dict()
        for text in assignments:
            key, value = parse_assignment(text)
            parts = key.split(".")
            parts = parts if parts[0] in data else ["model"] + parts
            if parts[:2] == ["train", "lora"] and len(parts) > 2 and data["train"].get("lora") is None:
                from valle_jax.models.lora import LoraConfig

                data["train"]["lora"] = plain(LoraConfig())  # `train.lora.rank=8` without a LoRA starts one (defaults)
            _assign(data, key, parts, value)
        return Config.from_dict(data, where="overrides")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """A run YAML (model/data/train/mesh blocks) plus `key=value` overrides."""
    path = Path(path)
    data = _read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    cfg = Config.from_dict(data, where=str(path))
    return cfg.override(overrides or [])


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = [
    "AttentionImpl", "FUSED_ATTENTION", "CODEC_SPECS", "CodecKind", "Config", "ConfigError", "DataConfig", "Experimental", "FrozenMap",
    "GroupNorm", "MeshConfig", "ModelConfig", "Optimizer", "Restore", "RetNetMode", "STOP_TOKEN", "Schedule", "TokenizerKind",
    "TrainConfig", "compute_dtype", "describe_attention", "load_config", "load_reference_yaml", "load_yaml", "parse_assignment", "plain",
    "resolve_attention", "runtime_config", "device_platform", "save_config", "save_yaml",
]  # fmt: skip
