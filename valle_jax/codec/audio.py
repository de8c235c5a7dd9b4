"""Audio file I/O with soundfile (libsndfile): no torch, no torchaudio, no torchcodec.

`read_audio` reads anything libsndfile reads (wav, flac, ogg/vorbis, mp3 with libsndfile >= 1.1, ...) to
float32 mono, the whole file or only its first `seconds`; `write_wav` writes a wav atomically (temporary name
in the same folder, then rename). Resampling to a codec's rate happens inside the codec sidecar, as the
reference does it.

Prompts: the reference encodes a prompt file whole and keeps the first `prompt_seconds` of codes. Reading
only `prompt_seconds + ENCODE_MARGIN_SECONDS` gives EnCodec (and so Vocos) the same first codes (its encoder
is causal; the margin covers the resampler's few samples of look-ahead) at a cost that does not grow with the
file. DAC normalises the loudness of what it is given, so its codes of a head differ from those of the whole.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from valle_jax.fileio import atomic_write

__all__ = ["AudioFileError", "ENCODE_MARGIN_SECONDS", "read_audio", "write_wav", "to_mono"]

ENCODE_MARGIN_SECONDS = 0.1  # audio read past what is kept, so the kept codes are those of the whole file


class AudioFileError(ValueError):
    """An audio file that soundfile cannot read or that holds no samples."""


def to_mono(wav: np.ndarray, mix: str = "mean") -> np.ndarray:
    """[n] or [n, channels] -> float32 [n].

    mix="mean" averages the channels (the reference's dataset processing); mix="first" keeps channel 0
    (what the reference does for a prompt/reference clip).
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 1:
        return wav
    if wav.ndim != 2:
        raise ValueError(f"expected [samples] or [samples, channels], got shape {wav.shape}")
    if mix == "mean":
        return wav.mean(axis=1, dtype=np.float32)
    if mix == "first":
        return np.ascontiguousarray(wav[:, 0])
    raise ValueError(f"mix must be 'mean' or 'first', got {mix!r}")


def read_audio(path: os.PathLike | str, mix: str = "mean", seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file to (float32 mono waveform [n] in [-1, 1], sample_rate).

    `seconds` > 0 reads only the first ceil(seconds * rate) frames (all of a shorter file): the rest of the
    file is never decoded, so memory and time do not grow with its length. None or <= 0 reads it all.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = int(f.samplerate)
            frames = math.ceil(seconds * sr) if seconds is not None and seconds > 0 else -1
            wav = f.read(frames, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError, TypeError on odd inputs
        raise AudioFileError(f"{path}: soundfile cannot read it ({e})") from None
    if wav.shape[0] == 0:
        raise AudioFileError(f"{path}: holds no samples")
    return to_mono(wav, mix), sr


def write_wav(
    path: os.PathLike | str, wav: np.ndarray, sample_rate: int, subtype: str = "PCM_16"
) -> Path:
    """Write a mono [n] (or [n, channels]) float waveform as a wav file, atomically.

    Integer subtypes (PCM_16, PCM_24, PCM_32) clip the signal to [-1, 1]; "FLOAT" keeps it as is.
    """
    import soundfile as sf

    path = Path(path)
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim not in (1, 2):
        raise ValueError(f"expected [samples] or [samples, channels], got shape {wav.shape}")
    if not np.all(np.isfinite(wav)):
        raise ValueError("waveform holds NaN or inf")
    if subtype.upper().startswith("PCM"):
        wav = np.clip(wav, -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: sf.write(f, wav, int(sample_rate), subtype=subtype, format="WAV"))
    return path
