"""The evaluation worker's service: ASR (faster-whisper) and speaker embeddings (GE2E or WavLM+ECAPA), built in
the spawned worker process only (`valle_jax.worker.serve`), never in the JAX process.

Requests:
    ("transcribe", [(wave float32, sample_rate, language), ...]) -> [transcript, ...]
    ("embed", [(wave float32, sample_rate), ...])               -> [np.float32 [dim] unit vector or None, ...]
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

ASR_RATE = 16000  # Whisper's rate; GE2E and WavLM also take 16 kHz


def _resample(wave: np.ndarray, rate: int, target: int = ASR_RATE) -> np.ndarray:
    import librosa

    wave = np.asarray(wave, np.float32)
    return wave if rate == target else librosa.resample(wave, orig_sr=rate, target_sr=target, res_type="soxr_hq")


class AsrModel:
    """faster-whisper over a CTranslate2 Whisper model; deterministic decoding (beam search at temperature 0)."""

    def __init__(self, spec: dict[str, Any], device: str, compute_type: str, beam_size: int, threads: int):
        import ctranslate2
        import faster_whisper

        source = spec["source"]
        self.details = dict(spec["details"])
        if spec["is_path"]:
            os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder: never touch the network
        else:
            source = self._hub_path(source)
            from .models import sha256_file

            self.details.update(path=source, sha256=sha256_file(os.path.join(source, "model.bin")))
        self.model = faster_whisper.WhisperModel(source, device=device, compute_type=compute_type, cpu_threads=threads)
        self.beam_size = int(beam_size)
        self.details.update(library=f"faster-whisper {faster_whisper.__version__}, ctranslate2 {ctranslate2.__version__}",
                            device=device, compute_type=compute_type, beam_size=self.beam_size,
                            multilingual=bool(self.model.model.is_multilingual))  # fmt: skip

    @staticmethod
    def _hub_path(name: str) -> str:
        from faster_whisper.utils import download_model

        try:
            return download_model(name, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: one try on the network, unless the user said offline
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                raise RuntimeError(f"ASR model {name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
            try:
                return download_model(name)
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(
                    f"ASR model {name!r} is neither cached nor downloadable ({type(e).__name__}: {e}); "
                    "give --asr-model PATH to a CTranslate2 Whisper folder, or omit it for the packaged tiny.en"
                ) from None

    def transcribe(self, wave: np.ndarray, rate: int, language: str) -> str:
        language = (language or "en").split("-")[0].lower()
        if not self.model.model.is_multilingual and language != "en":
            raise ValueError(f"the ASR model is English-only; language {language!r} needs a multilingual one (--asr-model)")
        segments, _ = self.model.transcribe(
            _resample(wave, rate), language=language, beam_size=self.beam_size, temperature=0.0,
            condition_on_previous_text=False, without_timestamps=True, vad_filter=False,
        )  # fmt: skip
        return " ".join(s.text.strip() for s in segments).strip()


class Ge2eModel:
    """resemblyzer's GE2E encoder with its own preprocessing (volume normalisation, VAD silence trimming)."""

    LOSS_KEYS = {"similarity_weight", "similarity_bias"}  # the GE2E training loss's scale and bias
    MIN_SPEECH = ASR_RATE // 2  # VAD kept less than 0.5 s (noise, random-codec audio): embed the untrimmed clip

    def __init__(self, spec: dict[str, Any], device: str):
        import torch
        from resemblyzer import VoiceEncoder, audio, hparams

        self.encoder = VoiceEncoder(device, verbose=False, weights_fpath=spec["source"])
        state = torch.load(spec["source"], map_location="cpu", weights_only=True)["model_state"]
        result = self.encoder.load_state_dict(state, strict=False)  # as resemblyzer, but checked:
        unexpected = set(result.unexpected_keys) - self.LOSS_KEYS  # a wrong file must not load silently
        if result.missing_keys or unexpected:
            raise ValueError(f"{spec['source']}: not a GE2E encoder (missing {result.missing_keys}, unexpected {sorted(unexpected)})")
        self.audio, self.hparams = audio, hparams
        self.details = dict(spec["details"])

    def embed(self, wave: np.ndarray, rate: int) -> np.ndarray:
        wave = _resample(wave, rate, self.hparams.sampling_rate)
        wave = self.audio.normalize_volume(wave, self.hparams.audio_norm_target_dBFS, increase_only=True)
        trimmed = self.audio.trim_long_silences(wave)
        return self.encoder.embed_utterance(trimmed if len(trimmed) >= self.MIN_SPEECH else wave)


class EvalService:
    def __init__(self, config: dict[str, Any]):
        import torch

        threads = int(config.get("num_threads") or os.cpu_count() or 1)
        torch.set_num_threads(threads)
        self.asr = None
        if config.get("asr"):
            self.asr = AsrModel(config["asr"], config["asr_device"], config["compute_type"], config["beam_size"], threads)
        self.sim = None
        sim = config.get("sim")
        if sim and sim["kind"] == "ge2e":
            self.sim = Ge2eModel(sim, config["device"])
        elif sim:
            from .wavlm_ecapa import WavlmEcapaModel

            self.sim = WavlmEcapaModel(sim, config["device"])
        self.torch_version = str(torch.__version__)  # a TorchVersion would import torch in the parent to unpickle

    def info(self) -> dict[str, Any]:
        return {"asr": self.asr.details if self.asr else None, "sim": self.sim.details if self.sim else None,
                "torch": self.torch_version}  # fmt: skip

    def handle(self, op: str, args: Any) -> Any:
        if op == "transcribe":
            if self.asr is None:
                raise ValueError("this evaluator was started without an ASR model")
            return [self.asr.transcribe(w, sr, lang) for w, sr, lang in args]
        if op == "embed":
            if self.sim is None:
                raise ValueError("this evaluator was started without a speaker model")
            out = []
            for w, sr in args:
                e = np.asarray(self.sim.embed(w, sr), np.float32)
                norm = float(np.linalg.norm(e))
                out.append(e / norm if np.isfinite(e).all() and norm > 0 else None)
            return out
        raise ValueError(f"unknown request {op!r}")
