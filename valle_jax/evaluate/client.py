"""`Evaluator`: the JAX side's handle on the evaluation models, running in a spawned torch worker process.

    with Evaluator(EvalSettings()) as ev:                     # packaged Whisper tiny.en + GE2E
        [text] = ev.transcribe([(wave, 16000, "en")])
        [emb_a, emb_b] = ev.embed([(wave, 16000), (prompt, 24000)])
        ev.models                                              # what was loaded: names, versions, sha256

Models are resolved (and their pinned hashes checked) here, before anything is spawned; a missing one gives
MissingModelError saying what to install.  Deadlines, crash and restart behaviour are those of
`valle_jax.worker.SpawnedWorker`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..worker import SpawnedWorker, WorkerCrashError, WorkerError, WorkerTimeoutError
from .models import SIM_MODELS, resolve_asr, resolve_sim


class EvaluatorError(WorkerError):
    """The evaluation worker failed: it could not start (a model did not load), raised, died or hung."""


class EvaluatorCrashError(EvaluatorError, WorkerCrashError):
    pass


class EvaluatorTimeoutError(EvaluatorError, WorkerTimeoutError):
    pass


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate.  The defaults run fully offline on a CPU with the packaged models."""

    asr_model: str | None = None  # None: the packaged Whisper tiny.en; else a folder or a faster-whisper name
    asr: bool = True  # False: no transcripts (WER/CER null)
    asr_device: str | None = None  # None: same as device
    compute_type: str | None = None  # CTranslate2 compute type; None: int8 on CPU, float16 on CUDA
    beam_size: int = 5
    sim_model: str = "ge2e"  # "ge2e" | "wavlm-ecapa"
    sim_weights: str | None = None  # wavlm-ecapa: UniSpeech's wavlm_large_finetune.pth; ge2e: another .pt
    sim: bool = True  # False: no speaker similarity (sim null)
    device: str = "cpu"  # torch device of the speaker model (and of the ASR unless asr_device is given)
    language: str = "en"  # for items without a "language"
    num_threads: int | None = None  # CPU threads in the worker; None: all cores
    timeout: float = 300.0  # seconds per request (one clip)
    start_timeout: float = 600.0  # loading the models (a first librosa call compiles with numba)
    report: bool = True  # write index.html
    media: str = "embed"  # index.html audio: "embed" (data: URIs, one file) | "files" (DIR/media/ beside it)
    progress: bool = True

    def replace(self, **changes: Any) -> "EvalSettings":
        return dataclasses.replace(self, **changes)


class Evaluator(SpawnedWorker):
    """The evaluation models in a spawned torch worker.  See the module docstring."""

    error_class = EvaluatorError
    crash_class = EvaluatorCrashError
    timeout_class = EvaluatorTimeoutError

    def __init__(self, settings: EvalSettings = EvalSettings(), *, auto_restart: bool = True, max_restarts: int = 3):
        if settings.sim and settings.sim_model not in SIM_MODELS:
            raise ValueError(f"sim_model must be one of {SIM_MODELS}, got {settings.sim_model!r}")
        if settings.media not in ("embed", "files"):
            raise ValueError(f"media must be 'embed' or 'files', got {settings.media!r}")
        if not (settings.asr or settings.sim):
            raise ValueError("nothing to evaluate: both asr and sim are off")
        self.settings = settings
        asr = resolve_asr(settings.asr_model) if settings.asr else None
        sim = resolve_sim(settings.sim_model, settings.sim_weights) if settings.sim else None
        asr_device = settings.asr_device or settings.device
        compute_type = settings.compute_type or ("int8" if asr_device == "cpu" else "float16")
        config = {
            "asr": dataclasses.asdict(asr) if asr else None,
            "sim": dataclasses.asdict(sim) if sim else None,
            "asr_device": asr_device,
            "compute_type": compute_type,
            "beam_size": settings.beam_size,
            "device": settings.device,
            "num_threads": settings.num_threads,
        }
        self._specs = {"asr": asr.describe() if asr else None, "sim": sim.describe() if sim else None}
        super().__init__(
            "valle_jax.evaluate.service:EvalService",
            config,
            label="evaluation worker",
            title="evaluation worker",
            owner="Evaluator",
            loading="importing torch and loading the ASR and speaker models",
            thread_name="eval-worker",
            timeout=settings.timeout,
            start_timeout=settings.start_timeout,
            auto_restart=auto_restart,
            max_restarts=max_restarts,
        )

    def __enter__(self) -> "Evaluator":
        return self.start()

    @property
    def models(self) -> dict[str, Any]:
        """The models as loaded (after start: with library versions and resolved hub paths), for summary.json."""
        if self.info:
            return {"asr": self.info.get("asr"), "sim": self.info.get("sim"), "torch": self.info.get("torch")}
        return dict(self._specs)

    def transcribe(self, clips: Sequence[tuple[np.ndarray, int, str]], timeout: float | None = None) -> list[str]:
        """Transcripts of (mono float waveform, sample rate, language) clips."""
        return self.call("transcribe", [(np.asarray(w, np.float32), int(sr), lang) for w, sr, lang in clips], timeout)

    def embed(self, clips: Sequence[tuple[np.ndarray, int]], timeout: float | None = None) -> list[np.ndarray | None]:
        """Unit-length speaker embeddings of (mono float waveform, sample rate) clips (None where degenerate)."""
        return self.call("embed", [(np.asarray(w, np.float32), int(sr)) for w, sr in clips], timeout)
