"""Audio + transcripts -> phonemes, token ids and codec codes -> a prepared dataset (see records.py).

    summary = prepare_audio("LibriTTS/train-clean-100", "data/libritts", codec="encodec")

Steps, per chunk of utterances: a spawned process pool reads and checks each audio file and phonemizes its
transcript (espeak-ng through valle_jax.text) and tokenizes it; the codec sidecar (valle_jax.codec) encodes
the accepted clips in batches while the pool already works on the next chunk; finished utterances go into
ArrayRecord shards (written atomically, logged in ledger.jsonl).  A rerun skips every id that is in the
ledger or in rejected.jsonl, so it resumes an interrupted run and is a no-op after a complete one.

Inputs that are skipped, with their reason in rejected.jsonl: no/empty transcript, unreadable or corrupt
audio (a text file named .wav, a truncated wav), too short, too long, silent, a transcript espeak-ng or the
tokenizer cannot handle, a clip the codec fails on.  A missing espeak-ng or missing codec weights stop the
run with a message saying what to install (never a silent fallback to random codec weights).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import multiprocessing
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from valle_jax.codec.specs import CODEC_SPECS

from .records import DatasetWriter, Utterance
from .sources import SourceItem, discover

__all__ = [
    "PrepareError",
    "AudioLimits",
    "check_audio",
    "codec_settings",
    "open_codec",
    "prepare_audio",
    "random_codec_warning",
    "wav_truncation",
]

log = logging.getLogger(__name__)



class PrepareError(RuntimeError):
    """Preparation cannot run at all (missing espeak-ng, missing codec weights, bad arguments)."""


class Rejected(Exception):
    """One input is skipped; the message is its reason."""


@dataclass(frozen=True)
class AudioLimits:
    min_duration: float = 0.5
    max_duration: float = 20.0
    silence_db: float = -60.0  # RMS level in dBFS below which a clip counts as silent


# ----------------------------------------------------------------------------------------------- audio checks


def wav_truncation(path: str | os.PathLike) -> str | None:
    """For a RIFF/WAVE file whose data chunk claims more bytes than the file holds: a description; else None.

    libsndfile quietly reads what is there, so a cut-off download would otherwise pass as a shorter clip.
    Streaming writers put 0 or 0xFFFFFFFF in the size field; those are not treated as truncation."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
                return None
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
                if chunk_id == b"data":
                    if chunk_size in (0, 0xFFFFFFFF) or head[:4] == b"RF64":
                        return None
                    have = size - (pos + 8)
                    if have < chunk_size:
                        return f"truncated wav: the header announces {chunk_size} bytes of audio, the file holds {have}"
                    return None
                pos += 8 + chunk_size + (chunk_size & 1)
            return "truncated wav: no data chunk"
    except OSError:
        return None


def check_audio(path: str, limits: AudioLimits) -> tuple[np.ndarray, int, float]:
    """Read and check one file: (float32 mono wave, sample rate, seconds); `Rejected(reason)` otherwise."""
    from valle_jax.codec.audio import AudioFileError, read_audio

    if not os.path.isfile(path):
        raise Rejected("audio file not found")
    problem = wav_truncation(path)
    if problem:
        raise Rejected(problem)
    try:
        wav, sr = read_audio(path)
    except AudioFileError as e:
        raise Rejected(f"unreadable audio: {e}") from None
    except Exception as e:  # noqa: BLE001 - anything libsndfile throws at a damaged file
        raise Rejected(f"unreadable audio: {type(e).__name__}: {e}") from None
    if not np.all(np.isfinite(wav)):
        raise Rejected("corrupt audio: holds NaN or inf samples")
    duration = wav.shape[0] / float(sr)
    if duration < limits.min_duration:
        raise Rejected(f"too short: {duration:.3f} s < min_duration {limits.min_duration} s")
    if duration > limits.max_duration:
        raise Rejected(f"too long: {duration:.3f} s > max_duration {limits.max_duration} s")
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    level = 20.0 * math.log10(rms) if rms > 0 else -math.inf
    if level < limits.silence_db:
        raise Rejected(f"silent: RMS level {level:.1f} dBFS < {limits.silence_db} dBFS")
    return wav, int(sr), duration


def clean_text(text: str) -> str:
    return " ".join(text.split())


def text_to_ids(text: str, language: str, tokenizer: str) -> tuple[str, np.ndarray]:
    """Phonemes and token ids of one transcript; `Rejected` when espeak-ng / the tokenizer cannot handle it.
    A missing espeak-ng is not a property of the input: it raises EspeakNotFoundError."""
    from valle_jax.text import EspeakNotFoundError, FrontEndError, get_tokenizer, phonemize

    try:
        phonemes = phonemize(text, language)
    except EspeakNotFoundError:
        raise
    except FrontEndError as e:
        raise Rejected(f"phonemizer: {e}") from None
    if not phonemes.strip():
        raise Rejected("phonemizer gave no phonemes for the transcript")
    try:
        ids = get_tokenizer(tokenizer).encode(phonemes)
    except FrontEndError as e:
        raise Rejected(f"tokenizer: {e}") from None
    return phonemes, np.asarray(ids, np.int64)


def analyse(item: SourceItem, tokenizer: str, limits: AudioLimits) -> dict[str, Any]:
    """Worker job: transcript and audio checks, phonemes and ids. Returns {"ok": True, ...} or
    {"ok": False, "reason": ...}; raises only for problems of the machine (no espeak-ng)."""
    try:
        if item.problem:
            raise Rejected(item.problem)
        text = clean_text(item.text or "")
        if not text:
            raise Rejected("empty transcript")
        wav, sr, duration = check_audio(item.audio, limits)
        phonemes, ids = text_to_ids(text, item.language, tokenizer)
        return {"ok": True, "text": text, "phonemes": phonemes, "ids": ids, "wav": wav, "sr": sr, "duration": duration}
    except Rejected as e:
        return {"ok": False, "reason": str(e)}


# ----------------------------------------------------------------------------------------------- codec


def random_codec_warning(codec: str, seed: int) -> str:
    return (
        f"codes come from a RANDOMLY INITIALISED {codec} (seed {seed}), not the real codec: they only suit "
        "tests and demos of the pipeline; released VALL-E weights and real decoders cannot use them"
    )


def banner(message: str, out: Callable[[str], None] | None = None) -> None:
    out = out or (lambda s: print(s, file=sys.stderr, flush=True))
    line = "!" * 100
    out(f"{line}\n!! WARNING: {message}\n{line}")


def codec_settings(codec: str, random_codec: int | None) -> dict:
    if codec not in CODEC_SPECS:
        raise PrepareError(f"--codec must be one of {', '.join(CODEC_SPECS)}; got {codec!r}")
    spec = CODEC_SPECS[codec]
    encoder = CODEC_SPECS[spec.encoder]  # Vocos datasets hold EnCodec codes
    settings = {"codec": codec, "levels": encoder.levels, "sample_rate": encoder.sample_rate,
                "frames_per_second": spec.reference_fps, "random_codec": random_codec}  # fmt: skip
    if random_codec is not None:
        settings["warning"] = random_codec_warning(codec, random_codec)
    return settings


def open_codec(codec: str, weights: str | None = None, random_codec: int | None = None, *,
               device: str = "cpu", batch_size: int = 16, timeout: float = 1800.0):  # fmt: skip
    """The sidecar that encodes for `codec` (Vocos datasets hold EnCodec codes, so EnCodec encodes them).
    Weights are looked up now (nothing is spawned yet): missing ones give PrepareError naming the file."""
    from valle_jax.codec import CodecClient, MissingWeightsError

    kind = "dac" if codec == "dac" else "encodec"
    try:
        if random_codec is not None:
            return CodecClient(kind, random_seed=int(random_codec), device=device, batch_size=batch_size, timeout=timeout)
        return CodecClient(kind, weights, device=device, batch_size=batch_size, timeout=timeout)
    except MissingWeightsError as e:
        raise PrepareError(
            f"{e}\nPreparation needs the real {kind} weights. (For a pipeline test only, `--random-codec SEED` "
            "encodes with a seeded random codec instead; its codes are useless for real training.)"
        ) from None


def encode_batch(client, waves: list[np.ndarray], rates: list[int]) -> list[np.ndarray | str]:
    """Codes per clip, or an error text for a clip the codec failed on (a failed batch is retried clip by clip).
    A sidecar that keeps dying (restarts used up) stops the run instead: that is the machine, not the input."""
    from valle_jax.codec import CodecCrashError, CodecError, CodecTimeoutError

    def fatal(e: Exception) -> bool:
        return isinstance(e, (CodecCrashError, CodecTimeoutError)) and client.restarts >= client.max_restarts

    if not waves:
        return []
    try:
        return list(client.encode(waves, rates))
    except (CodecError, ValueError) as e:
        if fatal(e):
            raise PrepareError(f"the codec sidecar keeps failing ({e}); finished shards are kept, rerun to resume") from e
        if len(waves) == 1:
            return [f"codec failed: {e}"]
        log.warning("codec failed on a batch (%s); encoding its clips one by one", e)
    out: list[np.ndarray | str] = []
    for w, r in zip(waves, rates):
        try:
            out.append(client.encode([w], r)[0])
        except (CodecError, ValueError) as e:
            if fatal(e):
                raise PrepareError(f"the codec sidecar keeps failing ({e}); finished shards are kept, rerun to resume") from e
            out.append(f"codec failed: {e}")
    return out


# ----------------------------------------------------------------------------------------------- driver


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="utt", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def prepare_audio(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    codec: str = "encodec",
    codec_weights: str | None = None,
    random_codec: int | None = None,
    tokenizer: str = "bpe",
    language: str = "en",
    eval_fraction: float = 0.02,
    limits: AudioLimits = AudioLimits(),
    workers: int | None = None,
    shard_size: int = 512,
    chunk_size: int = 64,
    codec_batch: int = 16,
    device: str = "cpu",
    retry_rejected: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    items: list[SourceItem] | None = None,
) -> dict:
    """Prepare `src` (a LibriTTS-style tree or a .csv/.jsonl manifest) into the dataset folder `out`.

    Returns a summary: counts of utterances added, skipped now, already done; the metadata counts; the
    settings.  `workers`: processes for audio checks and phonemization (None = all cores, 0 = in this
    process).  See the module docstring for what is rejected and how reruns resume."""
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    if tokenizer not in ("bpe", "naive"):
        raise PrepareError(f"--tokenizer must be bpe or naive, got {tokenizer!r}")
    settings = {**codec_settings(codec, random_codec), "tokenizer": tokenizer}
    if random_codec is not None:
        banner(settings["warning"], say)
    items = discover(src, language) if items is None else items
    workers = (os.cpu_count() or 1) if workers is None else int(workers)

    with DatasetWriter(out, settings, shard_size=shard_size, eval_fraction=eval_fraction,
                       retry_rejected=retry_rejected) as writer:  # fmt: skip
        todo = [it for it in items if not writer.is_done(it.id)]
        already = len(items) - len(todo)
        say(f"prepare: {len(items)} utterances found in {src}; {already} already done, {len(todo)} to do -> {out}")
        if todo:
            _run(todo, writer, codec, codec_weights, random_codec, tokenizer, limits, workers, chunk_size,
                 codec_batch, device, progress)  # fmt: skip
        meta = writer.close()
    assert meta is not None
    summary = {"found": len(items), "already_done": already, "added": writer.added, "rejected_now": writer.rejected_now,
               "rejected_reasons": dict(writer.reasons), "counts": meta["counts"], "hours": meta["hours"],
               "settings": settings, "out": str(out)}  # fmt: skip
    say(f"prepare: added {writer.added}, skipped {writer.rejected_now} (see {Path(out) / 'rejected.jsonl'}); dataset "
        f"now holds {meta['counts']['train']} train + {meta['counts']['eval']} eval utterances "
        f"({meta['hours']['train'] + meta['hours']['eval']:.3f} h)")  # fmt: skip
    if writer.reasons:
        say("prepare: skipped because: " + ", ".join(f"{n} {why}" for why, n in writer.reasons.most_common()))
    if settings.get("random_codec") is not None:
        banner(settings["warning"], say)
    return summary


def _run(todo, writer, codec, codec_weights, random_codec, tokenizer, limits, workers, chunk_size, codec_batch,
         device, progress) -> None:  # fmt: skip
    from valle_jax.text import espeak_available

    if not espeak_available():
        from valle_jax.text import ESPEAK_INSTALL_COMMAND

        raise PrepareError(f"espeak-ng is not installed (the phonemizer needs it): {ESPEAK_INSTALL_COMMAND}")
    client = open_codec(codec, codec_weights, random_codec, device=device, batch_size=codec_batch)
    executor = None
    if workers > 0 and len(todo) > 1:
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn")
        )
    job = lambda chunk: (executor.map(analyse, chunk, itertools.repeat(tokenizer), itertools.repeat(limits))  # noqa: E731
                         if executor else map(analyse, chunk, itertools.repeat(tokenizer), itertools.repeat(limits)))  # fmt: skip
    chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
    bar = _progress(len(todo), "prepare", progress)
    try:
        pending = job(chunks[0])
        for ci, chunk in enumerate(chunks):
            results = list(pending)
            if ci + 1 < len(chunks):
                pending = job(chunks[ci + 1])  # the pool works on the next chunk while the codec encodes
            good = []
            for item, res in zip(chunk, results):
                if res["ok"]:
                    good.append((item, res))
                else:
                    writer.reject(item.id, item.audio, res["reason"])
            codes = encode_batch(client, [r["wav"] for _, r in good], [r["sr"] for _, r in good])
            for (item, res), c in zip(good, codes):
                if isinstance(c, str):
                    writer.reject(item.id, item.audio, c)
                    continue
                writer.add(Utterance(id=item.id, speaker=item.speaker, text=res["text"], phonemes=res["phonemes"],
                                     language=item.language, text_ids=res["ids"], codes=np.asarray(c, np.int16),
                                     duration=res["duration"], source=item.audio))  # fmt: skip
            bar.update(len(chunk))
            bar.set_postfix(added=writer.added, skipped=writer.rejected_now)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        client.close()
