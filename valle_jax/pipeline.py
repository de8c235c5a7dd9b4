"""Synthesis as a library: text -> prompt codes -> AR (continuous batching) -> NAR -> codec, with typed settings.

    models = load_models("models/ar+nar-llama-8")
    with CodecClient(models.codec) as codec:
        syn = Synthesizer(models, Settings(slots=16), codec)
        requests = [syn.request("u1", {"text": "Hello.", "prompt": "ref.wav"})]   # ItemError on bad input
        for out in syn.run(requests):                                            # as items finish
            out.audio, out.codes, out.error ...

Every synthesis path of valle_jax goes through here: the job CLI (synthesize.py), the audio samples written during
training (eval_samples.py), tools/bench_synth.py and tools/parity.py. The stages are also usable alone:
`request_batch` (padded inputs), `ar_codes` / `nar_codes` (one compiled program per shape), `level0` (the AR
tokens the NAR and the codec get), `codec_codes` (what the codec may decode).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from valle_jax import sampling
from valle_jax.config import ConfigError, FrozenMap, ModelConfig, runtime_config
from valle_jax.generate import ARResult, ARScheduler, ar_generate, nar_generate, place_batch, single_device_mesh
from valle_jax.layout import Batch, before_stop, bucket, make_batch

SILENCE_RMS = 1e-4  # a prompt quieter than this (float samples in [-1, 1]) is treated as silent


class ItemError(ValueError):
    """One item cannot be synthesized (bad input); a job records it and goes on.  Permanent: the same input fails
    the same way again (see `error_kind`)."""


PERMANENT, TRANSIENT = "permanent", "transient"


def error_kind(error: BaseException) -> str:
    """TRANSIENT for a failure a retry may not meet again (the codec sidecar crashed or timed out, memory ran
    out), PERMANENT for anything else (bad input: the same item fails the same way)."""
    from valle_jax.worker import WorkerCrashError, WorkerTimeoutError

    if isinstance(error, (WorkerCrashError, WorkerTimeoutError, MemoryError)):
        return TRANSIENT
    text = f"{type(error).__name__}: {error}"
    # XLA reports an exhausted device as RESOURCE_EXHAUSTED; torch (in the codec sidecar) as OutOfMemoryError
    if "RESOURCE_EXHAUSTED" in text or "OutOfMemoryError" in text or "out of memory" in text.lower():
        return TRANSIENT
    return PERMANENT


def _stage_name(setting: str, stage: str) -> str:
    """The manifest / CLI name of a sampler setting: temperatures are per stage (ar_/nar_), the rest shared."""
    return f"{stage}_{setting}" if setting in ("temperature", "min_temperature") else setting


AR_KEYS = {_stage_name(s, "ar"): s for s in sampling.SETTINGS}  # manifest/CLI name -> AR sampler setting
NAR_KEYS = {_stage_name(s, "nar"): s for s in sampling.NAR_SETTINGS}
ITEM_KEYS = {"id", "text", "prompt", "codes", "language", "max_ar_steps", "lora"} | set(AR_KEYS) | set(NAR_KEYS)

# Sampler settings with a range narrower than "any finite number": the values that would crash or give NaN
# (a zero or negative divisor or base); everything the reference gives a meaning to is accepted.
_POSITIVE_SETTINGS = ("repetition_penalty", "dry_base")
_NON_NEGATIVE_SETTINGS = ("dry_allowed_length",)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclass(frozen=True)
class Settings:
    """How a job synthesizes (the CLI's flags; every field has the reference CLI's behaviour by default)."""

    max_ar_steps: int = 900  # AR tokens per text line (12 s at 75 frames/s)
    max_nar_levels: int = 7  # NAR levels after level 0
    prompt_seconds: float = 3.0  # keep the prompt's first N seconds (0 = all)
    max_prompt_frames: int = 512
    max_text_tokens: int = 512
    slots: int = 16  # AR items decoded together
    chunk: int = 32  # AR steps between slot refills
    continuous: bool = True  # a finished slot takes the next item (False: static batches)
    seed: int = 0
    preset: str = "cli"  # sampler defaults (sampling.ar_defaults / nar_defaults)
    ar: Mapping[str, float] = field(default_factory=FrozenMap)  # AR sampler settings for every item
    nar: Mapping[str, float] = field(default_factory=FrozenMap)
    language: str = "en"
    beam_width: int = 0  # > 1: beam search, each item takes this many slots (causal_size 1 models only)
    mirostat_shared: bool = False  # True: the reference's one mirostat state for the whole batch (parity only)
    lora: str | None = None  # a reference LoRA file (.sft/.pth) for every item without a "lora" of its own

    def __post_init__(self):
        object.__setattr__(self, "ar", FrozenMap(self.ar))
        object.__setattr__(self, "nar", FrozenMap(self.nar))
        for name in ("max_ar_steps", "max_prompt_frames", "max_text_tokens", "slots", "chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: expected an integer >= 1")
        if not isinstance(self.beam_width, int) or isinstance(self.beam_width, bool) or self.beam_width < 0:
            raise ConfigError(f"beam_width = {self.beam_width!r}: expected an integer >= 0")
        if not isinstance(self.max_nar_levels, int) or self.max_nar_levels < 0:
            raise ConfigError(f"max_nar_levels = {self.max_nar_levels!r}: expected an integer >= 0")
        if self.preset not in ("cli", "inference", "forward"):
            raise ConfigError(f"preset = {self.preset!r}: expected cli, inference or forward")
        if self.lora is not None and not (isinstance(self.lora, str) and self.lora.strip()):
            raise ConfigError(f"lora = {self.lora!r}: expected the path of a LoRA file (.sft/.pth)")

    @classmethod
    def greedy(cls, **kw: Any) -> "Settings":
        """Temperature 0 for the AR and the NAR (deterministic; what parity and training samples use)."""
        return cls(ar={"temperature": 0.0}, nar={"temperature": 0.0}, **kw)


@dataclass(frozen=True)
class Models:
    """The AR model and the NAR model (the same one for ar+nar checkpoints), as they run here."""

    cfg: ModelConfig
    params: Any
    nar_cfg: ModelConfig
    nar_params: Any

    @property
    def codec(self) -> str:
        return str(self.cfg.codec)


def load_models(checkpoint: str | Path, nar_checkpoint: str | Path | None = None, *, dtype: str = "auto",
                attention: str | None = None, heads: int | None = None) -> Models:  # fmt: skip
    """Load a model directory or reference .sft/.pth (plus a separate NAR model), compute dtype decided here."""
    from valle_jax.checkpoint import cast_tree
    from valle_jax.convert import load_any

    def one(path):
        cfg, params = load_any(path, heads=heads, dtype=np.float32)
        cfg = runtime_config(cfg, dtype, attention)
        return cfg, cast_tree(params, cfg.dtype, jax.numpy.asarray)

    cfg, params = one(checkpoint)
    if not cfg.causal:
        raise ConfigError(f"{checkpoint} has no AR capability ({list(cfg.capabilities)}); give an AR model as the "
                          "checkpoint and the NAR one as the NAR checkpoint")  # fmt: skip
    nar_cfg, nar_params = one(nar_checkpoint) if nar_checkpoint else (cfg, params)
    if not nar_cfg.has_nar:
        raise ConfigError(f"{nar_checkpoint or checkpoint} has no NAR capability ({list(nar_cfg.capabilities)})")
    return Models(cfg, params, nar_cfg, nar_params)


# ---------------------------------------------------------------------------------------------------------
# stages


def request_batch(texts: Sequence[np.ndarray], proms: Sequence[np.ndarray], resps: Sequence[np.ndarray] | None = None,
                  pad_to: Mapping[str, int] | None = None, level: int = 0) -> Batch:  # fmt: skip
    """Inputs of a generation batch (numpy): text ids, prompt codes and (NAR) the level-0 codes so far."""
    resps = resps if resps is not None else [np.zeros((1, 1), np.int32)] * len(texts)
    items = [{"text": t, "prom": p, "resp": np.asarray(r).reshape(len(r), -1) if len(r) else np.zeros((1, 1), np.int32),
              "level": level} for t, p, r in zip(texts, proms, resps)]  # fmt: skip
    return make_batch(items, pad_to=pad_to)


_ar_jit = jax.jit(ar_generate, static_argnums=(0, 3), static_argnames=("features", "chunk"))
_nar_jit = jax.jit(nar_generate, static_argnums=(0,), static_argnames=("max_levels", "features", "with_finite"))


def _features(sp: sampling.SamplingParams | None) -> sampling.Features:
    """The sampler steps a program needs for these settings (greedy when none are given)."""
    return sampling.NO_FEATURES if sp is None else sampling.features_of(sp)


def ar_codes(cfg: ModelConfig, params: Any, batch: Batch, max_steps: int, *, key: jax.Array | None = None,
             sampling_params: sampling.SamplingParams | None = None) -> ARResult:  # fmt: skip
    """Level-0 tokens of a static batch (one compiled program per shape and sampler features; device arrays,
    not waited for)."""
    return _ar_jit(cfg, params, batch, max_steps, key=key, sampling_params=sampling_params,
                   features=_features(sampling_params))  # fmt: skip


def nar_codes(cfg: ModelConfig, params: Any, batch: Batch, level0_BR: Any, *, max_levels: int | None = None,
              key: jax.Array | None = None, sampling_params: sampling.SamplingParams | None = None,
              with_finite: bool = False, lora: Any = None, lora_index: Any = None) -> jax.Array | tuple[jax.Array, jax.Array]:  # fmt: skip
    """Codes [B, R, Q]: column 0 the given level-0 codes, levels 1..max_levels from the NAR passes
    (`with_finite`: and finite [B], False where the item's NAR logits held NaN/inf). `lora` (a
    models.lora.LoraStack) / `lora_index` [B]: the LoRAs and each item's (-1: none)."""
    return _nar_jit(cfg, params, batch, level0_BR, max_levels=max_levels, key=key, sampling_params=sampling_params,
                    features=_features(sampling_params), with_finite=with_finite, lora=lora, lora_index=lora_index)  # fmt: skip


def level0(raw: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """The AR's result as the NAR and the codec take it: every token before the first stop token (the stop token
    is the only id outside the codebook the level-0 head can give)."""
    return before_stop(np.asarray(raw), cfg.stop_token).astype(np.int32)


def codec_codes(codes: np.ndarray, cfg: ModelConfig, levels: int | None = None) -> np.ndarray:
    """Codes [frames, levels] the codec may decode: the levels made, values in the codebook. A single (1025-wide)
    head can give the stop id at a NAR level, where the reference would fail: it is mapped to the last code."""
    codes = np.asarray(codes)[:, : levels or codes.shape[1]]
    return np.clip(codes, 0, cfg.audio_tokens - 1).astype(np.int16)


def _shown(value: Any) -> str:
    """A manifest value as JSON writes it (null, "abc", Infinity), for messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_setting(name: str, setting: str, value: Any) -> float | int:
    """One sampler setting (`name` as the manifest or CLI spells it) checked for type and range; ItemError
    naming it and what is expected."""
    if setting in sampling.INT_SETTINGS:
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) > _INT32_MAX:
            raise ItemError(f"field {name!r} = {_shown(value)}: expected an integer")
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ItemError(f"field {name!r} = {_shown(value)}: expected a finite number")
    if setting in _POSITIVE_SETTINGS and not value > 0:
        raise ItemError(f"field {name!r} = {_shown(value)}: expected a number > 0")
    if setting in _NON_NEGATIVE_SETTINGS and value < 0:
        raise ItemError(f"field {name!r} = {_shown(value)}: expected an integer >= 0")
    return value


def item_settings(item: Mapping[str, Any], keys: Mapping[str, str]) -> dict:
    """The sampler settings an item sets (manifest names in `keys` -> setting names), checked."""
    return {setting: check_setting(name, setting, item[name]) for name, setting in keys.items() if name in item}


def check_max_ar_steps(value: Any, limit: int) -> int:
    """An item's `max_ar_steps`: an integer from 1 to the job's limit (which sizes the decoding cache)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise ItemError(f"field 'max_ar_steps' = {_shown(value)}: expected an integer from 1 to {limit} "
                        "(the job's --max-ar-steps; raise it for longer items)")  # fmt: skip
    return value


def _paths(name: str, value: Any) -> list[str]:
    """A manifest path field: one path or a non-empty list of paths (non-empty strings)."""
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        raise ItemError(f"field {name!r} = {_shown(value)}: expected a path or a non-empty list of paths")
    return paths


def check_item(item: Mapping[str, Any]) -> None:
    """Type checks of an item's fields that need no model (ItemError naming the field): known fields only,
    `text` and `language` strings, `prompt` a path or a list of paths, `codes` a path, and a prompt given."""
    unknown = sorted(set(item) - ITEM_KEYS)
    if unknown:
        raise ItemError(f"unknown field(s) {unknown}; expected some of {sorted(ITEM_KEYS)}")
    if "id" in item and not isinstance(item["id"], str):
        raise ItemError(f"field 'id' = {_shown(item['id'])}: expected a string")
    if not isinstance(item.get("text"), str):
        raise ItemError(f"field 'text' = {_shown(item.get('text'))}: expected a string")
    if "language" in item and not (isinstance(item["language"], str) and item["language"].strip()):
        raise ItemError(f"field 'language' = {_shown(item['language'])}: expected a language code such as 'en'")
    if "codes" in item and not (isinstance(item["codes"], str) and item["codes"].strip()):
        raise ItemError(f"field 'codes' = {_shown(item['codes'])}: expected the path of a .enc/.dac codes file")
    if item.get("lora") is not None and not (isinstance(item["lora"], str) and item["lora"].strip()):
        raise ItemError(f"field 'lora' = {_shown(item['lora'])}: expected the path of a LoRA file (.sft/.pth) or null")
    if "prompt" in item:
        _paths("prompt", item["prompt"])
    elif "codes" not in item:
        raise ItemError("no prompt: give 'prompt' (audio path or list of paths) or 'codes'")


# ---------------------------------------------------------------------------------------------------------
# requests and results


@dataclass
class Request:
    """One item ready for generation: token ids per text line, prompt codes and its sampler settings."""

    id: Any
    lines: list[np.ndarray]
    prom: np.ndarray  # [P, Q] int32
    max_tokens: int
    ar: dict = field(default_factory=dict)  # AR sampler settings of this item (over the job's `Settings.ar`)
    nar: dict = field(default_factory=dict)
    lora: str | None = None  # the item's LoRA file (loaded by Synthesizer.load_lora), None: the base alone


@dataclass
class Output:
    """One finished item: audio (or the error that stopped it), the codes of each line, timings."""

    id: Any
    audio: np.ndarray | None
    codes: list[np.ndarray]
    error: str | None = None
    seconds: float = 0.0  # of audio
    wall_s: float = 0.0  # from the first line entering the AR to the audio
    error_kind: str | None = None  # PERMANENT or TRANSIENT with an error (see `error_kind`)


@dataclass
class _Pending:
    request: Request
    started: float
    codes: dict[int, np.ndarray] = field(default_factory=dict)
    audio: dict[int, np.ndarray] = field(default_factory=dict)
    received: int = 0
    error: str | None = None
    error_kind: str | None = None


def _failed(message: str) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_exception(ItemError(message))
    return fut


def _done(value: Any) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(value)
    return fut


# ---------------------------------------------------------------------------------------------------------
# the synthesizer


class Synthesizer:
    """Turns items into requests (text front end, prompt encoding) and requests into audio.

    `codec` is a started `valle_jax.codec.CodecClient` (None: `run` yields codes only and no audio; prompts
    must then be given as codes). The AR decodes `settings.slots` lines at a time with continuous batching; the
    NAR runs on groups of finished lines; decoding to audio overlaps with generation.

    `mesh` (default: one device): the slots of the AR and the items of each NAR batch are split over its batch
    axes (`parallel.synthesis_mesh()`: every local device), by the logical-axis `rules` (default: the
    training rules); a job's tokens do not depend on the number of devices.
    """

    def __init__(self, models: Models, settings: Settings = Settings(), codec: Any = None, *, mesh: Any = None,
                 rules: Any = None):  # fmt: skip
        from valle_jax import parallel
        from valle_jax.codec import codec_spec
        from valle_jax.generate import place_params

        self.models, self.settings, self.codec = models, settings, codec
        self.spec = codec_spec(codec.kind if codec is not None else models.codec)
        self.levels = models.nar_cfg.resp_levels
        self._front: dict[tuple[str, str], Any] = {}
        if settings.beam_width > 1 and models.cfg.causal_size != 1:
            raise ConfigError(f"beam_width {settings.beam_width}: beam search needs a causal_size 1 model (the "
                              f"reference's beam path); this one predicts {models.cfg.causal_size} tokens per step")
        self.made_levels = 1 + min(settings.max_nar_levels, self.levels - 1)  # level 0 + the NAR levels made
        self.decode_levels = self.made_levels
        if codec is not None:
            try:
                self.decode_levels = codec.decode_levels(self.made_levels)
            except ValueError as e:
                raise ConfigError(f"max_nar_levels {settings.max_nar_levels}: {e}") from None
        self.mesh = mesh if mesh is not None else single_device_mesh()
        self.rules = rules if rules is not None else parallel.axis_rules()
        self._batch_divisor = parallel.batch_divisor(self.mesh, self.rules)
        self._ar_params = place_params(models.cfg, models.params, self.mesh, self.rules)
        same = models.nar_params is models.params and models.nar_cfg == models.cfg
        self._nar_params = self._ar_params if same else place_params(models.nar_cfg, models.nar_params, self.mesh, self.rules)
        self._separate_nar = not same
        self._loras: dict[str, tuple[Any, dict]] = {}  # LoRA file (resolved path) -> (LoraConfig, params): once per job
        if settings.lora is not None:
            try:
                self.load_lora(settings.lora)
            except ItemError as e:
                raise ConfigError(f"--lora: {e}") from None

    def load_lora(self, path: str | Path) -> str:
        """Load a reference LoRA file once (checked against the base model: targets and shapes); returns the key
        requests name it by. ItemError when it is not a LoRA of this model."""
        from valle_jax.convert import CheckpointError
        from valle_jax.lora_files import read_lora

        key = str(Path(path).resolve())
        if key not in self._loras:
            if self._separate_nar:
                raise ItemError(f"lora {path}: a LoRA with a separate NAR model is not supported (give an ar+nar model)")
            if not Path(path).is_file():
                raise ItemError(f"lora {path}: no such file")
            try:
                lora_cfg, lora_params, _ = read_lora(path, self.models.cfg, self.models.params)
            except (CheckpointError, OSError, ValueError) as e:
                raise ItemError(f"lora {e}" if str(e).startswith(str(path)) else f"lora {path}: {e}") from None
            self._loras[key] = (lora_cfg, lora_params)
        return key

    def _lora_stack(self, requests: Sequence["Request"]) -> tuple[Any, dict[str, int]]:
        """The LoRAs of these requests stacked (models.lora.stack_loras) and each file's index in the stack."""
        from valle_jax.models.lora import stack_loras

        names = sorted({r.lora for r in requests if r.lora is not None})
        if not names:
            return None, {}
        for name in names:
            self.load_lora(name)
        stack = stack_loras([self._loras[str(Path(n).resolve())] for n in names], self.models.cfg.resp_levels)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())  # small: on every device
        return jax.device_put(stack, replicated), {n: i for i, n in enumerate(names)}

    # ----- inputs
    def text_ids(self, text: Any, language: str) -> list[np.ndarray]:
        """Token ids of each line of `text` (the reference synthesizes every line on its own)."""
        from valle_jax.text import FrontEndError, TextFrontEnd

        if not isinstance(text, str):
            raise ItemError(f"field 'text' = {_shown(text)}: expected a string")
        if not isinstance(language, str):
            raise ItemError(f"field 'language' = {_shown(language)}: expected a language code such as 'en'")
        if not text.strip():
            raise ItemError("empty text")
        key = (str(self.models.cfg.tokenizer), language)
        try:
            if key not in self._front:
                self._front[key] = TextFrontEnd(tokenizer=key[0], language=language)
            lines = self._front[key].ids(text)
        except FrontEndError as e:
            raise ItemError(str(e)) from None
        out = []
        for ids in lines:
            if len(ids) > self.settings.max_text_tokens:
                raise ItemError(f"text line of {len(ids)} tokens exceeds the limit of {self.settings.max_text_tokens} "
                              "(max_text_tokens, --max-text-tokens)")
            out.append(np.asarray(ids, np.int32))
        if not out:
            raise ItemError("empty text")
        return out

    def prompt_codes(self, item: Mapping[str, Any]) -> np.ndarray:
        """[frames, levels] prompt codes from a codes file or audio files (each encoded alone, spec 6.5), trimmed
        to `settings.prompt_seconds` and `max_prompt_frames`."""
        from valle_jax.codec import ENCODE_MARGIN_SECONDS, AudioFileError, CodecFileError, read_audio, read_codes

        if "codes" in item:  # a codes file wins over prompt audio (which evaluation may still compare with)
            if not isinstance(item["codes"], str) or not item["codes"].strip():
                raise ItemError(f"field 'codes' = {_shown(item['codes'])}: expected the path of a .enc/.dac codes file")
            try:
                codes, _ = read_codes(item["codes"])
            except (CodecFileError, OSError, ValueError, TypeError) as e:
                raise ItemError(f"codes {item['codes']}: {e}") from None
            parts = [np.asarray(codes)]
        else:
            if "prompt" not in item:
                raise ItemError("no prompt: give 'prompt' (audio path or list of paths) or 'codes'")
            paths = _paths("prompt", item["prompt"])
            if self.codec is None:
                raise ItemError("prompt audio needs a codec; give 'codes' instead")
            waves = []
            # only what is kept is read (and a little more, so the kept codes are those of the whole file);
            # stereo prompts: the first channel, as the reference (spec 8.3)
            keep = self.settings.prompt_seconds + ENCODE_MARGIN_SECONDS if self.settings.prompt_seconds > 0 else None
            for p in paths:
                try:
                    wav, sr = read_audio(p, mix="first", seconds=keep)
                except (FileNotFoundError, AudioFileError, OSError, ValueError) as e:
                    raise ItemError(f"prompt {p}: {e}") from None
                if not np.isfinite(wav).all() or float(np.sqrt(np.mean(np.square(wav)))) < SILENCE_RMS:
                    raise ItemError(f"prompt {p}: silent or invalid audio")
                waves.append((wav, sr))
            parts = [self.codec.encode([w], sr)[0] for w, sr in waves]
        codes = np.concatenate(parts, axis=0)
        if codes.ndim != 2 or codes.shape[1] < self.levels:
            raise ItemError(f"prompt codes have shape {list(codes.shape)}, expected [frames, >= {self.levels}]")
        if self.settings.prompt_seconds > 0:
            codes = codes[: int(self.spec.frames_per_second * self.settings.prompt_seconds)]
        return codes[: self.settings.max_prompt_frames, : self.levels].astype(np.int32)

    def request(self, item_id: Any, item: Mapping[str, Any]) -> Request:
        """Validate one manifest item and prepare it (text front end, prompt encoding); ItemError naming the field
        when bad.  Every field is checked (type and range) before any work, so a bad item costs nothing."""
        check_item(item)
        steps = check_max_ar_steps(item.get("max_ar_steps", self.settings.max_ar_steps), self.settings.max_ar_steps)
        ar, nar = item_settings(item, AR_KEYS), item_settings(item, NAR_KEYS)
        lines = self.text_ids(item["text"], item.get("language", self.settings.language))
        lora = item["lora"] if "lora" in item else self.settings.lora
        lora = self.load_lora(lora) if lora is not None else None
        prom = self.prompt_codes(item)
        return Request(item_id, lines, prom, steps, ar, nar, lora)

    # ----- generation
    def run(self, requests: Sequence[Request], progress: bool = True) -> Iterator[Output]:
        """Synthesize every request; yields an Output per request as soon as all its lines are decoded."""
        from tqdm import tqdm

        m, st = self.models, self.settings
        lines = [(r, i, ids) for r in requests for i, ids in enumerate(r.lines)]
        if not lines:
            return
        width = max(1, st.beam_width)
        self._stack, self._lora_index = self._lora_stack(requests)
        sched = ARScheduler(m.cfg, self._ar_params, slots=min(st.slots, len(lines) * width),
                            max_tokens=max(r.max_tokens for r in requests),
                            text_bucket=bucket(max(len(ids) for _, _, ids in lines)),
                            prom_bucket=bucket(max(len(r.prom) for r in requests)), chunk=st.chunk, seed=st.seed,
                            continuous=st.continuous, mesh=self.mesh, rules=self.rules, beam_width=st.beam_width,
                            mirostat_shared=st.mirostat_shared, lora=self._stack)  # fmt: skip
        now = time.perf_counter()
        pending = {r.id: _Pending(r, now) for r in requests}
        for r, i, ids in lines:
            sched.submit((r.id, i), ids, r.prom, r.max_tokens,
                         sampling.ar_defaults(1, st.preset, beam_width=st.beam_width, mirostat_shared=st.mirostat_shared,
                                              **{**st.ar, **r.ar}), self._lora_index.get(r.lora, -1))  # fmt: skip
        self._key = jax.random.key(st.seed + 1)
        self._buckets = (sched.text_bucket, sched.prom_bucket)
        group = len(sched.owner)  # lines decoded together: the NAR batches as many
        ready: list[tuple[tuple, np.ndarray]] = []
        nar: list[_NarBatch] = []  # NAR batches dispatched, not read back yet (the device runs them in order)
        futures: list[tuple[tuple, concurrent.futures.Future]] = []
        bar = tqdm(total=len(lines), desc="synthesize", unit="line", disable=not progress)
        audio_s, t0 = 0.0, time.perf_counter()
        for key, raw, _, finite in sched.run():
            bar.update(1)
            futures += self._decode(pending, nar)  # NAR batches dispatched before the last AR chunk are done
            if not finite:
                futures.append((key, _failed(f"line {key[1]}: NaN/inf in the model's logits")))
            else:
                tokens = level0(raw, m.cfg)
                ready.append((key, tokens))
                audio_s += len(tokens) / self.spec.frames_per_second
                bar.set_postfix(audio_s_per_s=f"{audio_s / (time.perf_counter() - t0):.1f}")
            while len(ready) >= group:
                nar.append(self._nar(pending, ready[:group], group))
                del ready[:group]
            yield from self._collect(futures, pending, wait=False)
        if ready:
            nar.append(self._nar(pending, ready, group))
        futures += self._decode(pending, nar)
        yield from self._collect(futures, pending, wait=True)
        bar.close()

    def _nar(self, pending: dict, lines: list[tuple[tuple, np.ndarray]], group: int) -> "_NarBatch":
        """Dispatch the NAR levels of a group of lines as one batch (not waited for). The batch is padded to a
        power of two (and to the mesh's batch shards), so a job compiles a few NAR programs only."""
        m, st = self.models, self.settings
        n = min(1 << (len(lines) - 1).bit_length(), max(group, len(lines)))
        n = -(-n // self._batch_divisor) * self._batch_divisor
        rows = lines + [lines[0]] * (n - len(lines))
        reqs = [pending[k[0]].request for k, _ in rows]
        text_b, prom_b = self._buckets
        R = bucket(max(max(len(t), 1) for _, t in rows))
        batch = request_batch([r.lines[k[1]] for r, (k, _) in zip(reqs, rows)], [r.prom for r in reqs],
                              [t for _, t in rows], pad_to={"text": text_b, "prom": prom_b, "resp": R})  # fmt: skip
        sp = sampling.stack_params([sampling.nar_defaults(1, st.preset, **{**st.nar, **r.nar}) for r in reqs])
        self._key, sub = jax.random.split(self._key)
        batch = place_batch(batch, self.mesh, self.rules)
        index = None
        if self._stack is not None:
            index = place_batch(np.array([self._lora_index.get(r.lora, -1) for r in reqs], np.int32), self.mesh, self.rules)
        codes, finite = nar_codes(m.nar_cfg, self._nar_params, batch, batch.resp[..., 0], max_levels=st.max_nar_levels,
                                  key=sub, sampling_params=place_batch(sp, self.mesh, self.rules), with_finite=True,
                                  lora=self._stack, lora_index=index)  # fmt: skip
        return _NarBatch(lines, codes, finite)

    def _decode(self, pending: dict, nar: list["_NarBatch"]) -> list[tuple[tuple, Any]]:
        """Read back the dispatched NAR batches and send their lines to the codec (asynchronous)."""
        m = self.models
        out = []
        for b in nar:
            codes, finite = np.asarray(b.codes), np.asarray(b.finite)
            for j, (k, tokens) in enumerate(b.lines):
                c = codec_codes(codes[j, : len(tokens)], m.nar_cfg, self.made_levels)
                pending[k[0]].codes[k[1]] = c
                if not finite[j]:
                    out.append((k, _failed(f"line {k[1]}: NaN/inf in the NAR model's logits")))
                elif not len(tokens):
                    out.append((k, _done([np.zeros((0,), np.float32)])))
                elif self.codec is None:
                    out.append((k, _done([None])))
                else:
                    out.append((k, self.codec.decode_async([c[:, : self.decode_levels]])))
        nar.clear()
        return out

    def _collect(self, futures: list, pending: dict, wait: bool) -> Iterator[Output]:
        from valle_jax.codec import CodecError

        keep = []
        for k, fut in futures:
            if not wait and not fut.done():
                keep.append((k, fut))
                continue
            item_id, index = k
            p = pending[item_id]
            p.received += 1
            try:
                audio = fut.result()[0]
                if audio is not None and not np.isfinite(audio).all():
                    raise ItemError(f"line {index}: NaN/inf in the decoded audio")
                p.audio[index] = audio
            except (CodecError, ItemError) as e:
                if p.error is None:
                    p.error, p.error_kind = str(e), error_kind(e)
            if p.received == len(p.request.lines):
                del pending[item_id]
                yield self._finish(p)
        futures[:] = keep

    def _finish(self, p: _Pending) -> Output:
        n = len(p.request.lines)
        codes = [p.codes.get(i, np.zeros((0, self.made_levels), np.int16)) for i in range(n)]
        wall = round(time.perf_counter() - p.started, 3)
        if p.error:
            return Output(p.request.id, None, codes, p.error, wall_s=wall, error_kind=p.error_kind)
        if self.codec is None:
            return Output(p.request.id, None, codes, None, wall_s=wall)
        audio = np.concatenate([p.audio[i] for i in range(n)])
        if audio.size == 0:
            return Output(p.request.id, None, codes, "the AR stopped at once: no audio", wall_s=wall, error_kind=PERMANENT)
        return Output(p.request.id, audio, codes, None, round(len(audio) / self.spec.sample_rate, 3), wall)


@dataclass
class _NarBatch:
    lines: list[tuple[tuple, np.ndarray]]  # (item id, line index), level-0 tokens
    codes: Any  # [n, R, Q] device array
    finite: Any  # [n]
