"""`evaluate_items`: the evaluation as a library call (the CLI, synthesis and training all come through here)."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from valle_jax.fileio import atomic_write

from .client import EvalSettings, Evaluator, EvaluatorError
from .items import EvalItem, item_from_dict
from .report import MediaSink, data_uri, picture_png, render
from .text import NORMALISATION, error_counts, normalize_text


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)


def _mean(values: list[float]) -> float | None:
    return _round(float(np.mean(values))) if values else None


def _read(path: str) -> tuple[np.ndarray, int]:
    """Mono float32 audio; ValueError naming the file for anything unusable."""
    from valle_jax.codec import AudioFileError, read_audio

    try:
        wave, rate = read_audio(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (AudioFileError, OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable audio ({e})") from None
    if wave.size == 0:
        raise ValueError(f"{path}: no samples")
    if not np.isfinite(wave).all():
        raise ValueError(f"{path}: holds NaN or inf")
    return wave, rate


class _PromptCache:
    """Speaker embeddings of prompt files, computed once per file; several files are averaged (unit mean)."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.embeddings: dict[str, np.ndarray | None] = {}
        self.waves: dict[str, tuple[np.ndarray, int]] = {}

    def wave(self, path: str) -> tuple[np.ndarray, int]:
        if path not in self.waves:
            self.waves[path] = _read(path)
        return self.waves[path]

    def embedding(self, paths: Sequence[str]) -> np.ndarray | None:
        todo = [p for p in paths if p not in self.embeddings]
        if todo:
            for p, e in zip(todo, self.evaluator.embed([self.wave(p) for p in todo])):
                self.embeddings[p] = e
        parts = [self.embeddings[p] for p in paths]
        if any(e is None for e in parts):
            return None
        mean = np.mean(parts, axis=0)
        return mean / np.linalg.norm(mean)


def _empty_record(item: EvalItem, language: str) -> dict[str, Any]:
    return {"id": item.id, "text": item.text, "normalized_text": None, "transcript": None,
            "normalized_transcript": None, "wer": None, "cer": None, "sim": None, "seconds": None,
            "word_errors": None, "words": None, "char_errors": None, "chars": None, "audio": item.audio,
            "prompt": list(item.prompt) or None, "language": language, "error": None}  # fmt: skip


def evaluate_one(ev: Evaluator, item: EvalItem, settings: EvalSettings, prompts: _PromptCache,
                 media: MediaSink | None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """(metrics.jsonl record, report row) of one item; every failure is recorded in `error`, never raised."""
    language = item.language or settings.language
    rec = _empty_record(item, language)
    row: dict[str, Any] = {}
    errors: list[str] = []
    if item.error:
        rec["error"] = item.error
        return rec, row
    try:
        wave, rate = _read(item.audio)
    except ValueError as e:
        rec["error"] = f"audio {e}"
        return rec, row
    rec["seconds"] = _round(len(wave) / rate, 3)
    if media is not None:
        row["output_src"] = media.audio(f"{item.id}.output", wave, rate)
        row["picture_src"] = data_uri("image/png", picture_png(wave, rate))
    if settings.asr:
        try:
            rec["normalized_text"] = normalize_text(item.text, language)
            [rec["transcript"]] = ev.transcribe([(wave, rate, language)])
            rec["normalized_transcript"] = normalize_text(rec["transcript"], language)
            counts = error_counts(item.text, rec["transcript"], language)
            rec.update(counts)
            rec["wer"] = _round(counts["word_errors"] / counts["words"])
            rec["cer"] = _round(counts["char_errors"] / counts["chars"])
        except (ValueError, EvaluatorError) as e:
            errors.append(f"ASR: {e}")
    if settings.sim and item.prompt:
        try:
            if media is not None:
                row["prompt_srcs"] = [media.audio(f"{item.id}.prompt{i}", *prompts.wave(p)) for i, p in enumerate(item.prompt)]
            ref = prompts.embedding(item.prompt)
            [out] = ev.embed([(wave, rate)])
            if ref is None or out is None:
                raise ValueError("no speaker embedding (silent or degenerate audio)")
            rec["sim"] = _round(float(np.dot(out, ref)))
        except ValueError as e:
            errors.append(f"prompt {e}")
        except EvaluatorError as e:
            errors.append(f"SIM: {e}")
    rec["error"] = "; ".join(errors) or None
    return rec, row


def summarize(records: Sequence[dict[str, Any]], models: dict[str, Any], settings: EvalSettings, source: str,
              elapsed: float) -> dict[str, Any]:  # fmt: skip
    def values(key: str) -> list[float]:
        return [r[key] for r in records if r.get(key) is not None]

    word_errors, words = sum(values("word_errors")), sum(values("words"))
    char_errors, chars = sum(values("char_errors")), sum(values("chars"))
    n_errors = sum(1 for r in records if r.get("error"))
    return {
        "n": len(records) - n_errors,
        "n_items": len(records),
        "n_errors": n_errors,
        "wer_mean": _mean(values("wer")),
        "cer_mean": _mean(values("cer")),
        "sim_mean": _mean(values("sim")),
        "wer_corpus": _round(word_errors / words) if words else None,
        "cer_corpus": _round(char_errors / chars) if chars else None,
        "n_wer": len(values("wer")),
        "n_sim": len(values("sim")),
        "seconds_total": _round(sum(values("seconds")), 3),
        "eval_seconds": _round(elapsed, 3),
        "models": models,
        "normalisation": NORMALISATION,
        "settings": {"beam_size": settings.beam_size, "language": settings.language, "asr": settings.asr,
                     "sim": settings.sim, "sim_model": settings.sim_model if settings.sim else None},  # fmt: skip
        "source": source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def evaluate_items(
    items: Sequence[EvalItem | dict],
    out_dir: str | Path,
    settings: EvalSettings = EvalSettings(),
    *,
    evaluator: Evaluator | None = None,
    source: str = "",
    say: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Evaluate items (EvalItem or dicts with id, text, audio, optional prompt/language) into out_dir.

    Writes out_dir/metrics.jsonl (one record per item, in order), out_dir/summary.json and, with
    settings.report, out_dir/index.html, each atomically; returns the summary.  Bad items are recorded with
    their error and the rest go on.  `evaluator`: a started Evaluator to reuse (training keeps one across
    evals so the models load once); by default one is started here and closed at the end.  Raises
    MissingModelError / ModelChecksumError (models) or EvaluatorError when the models cannot be loaded.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = [it if isinstance(it, EvalItem) else item_from_dict(it, f"item {i}", f"item{i}") for i, it in enumerate(items)]
    start = time.monotonic()
    ev = evaluator if evaluator is not None else Evaluator(settings)
    media = MediaSink(out_dir, settings.media) if settings.report else None
    records, rows = [], []
    try:
        ev.start()
        prompts = _PromptCache(ev)
        for item in tqdm(items, desc="evaluate", unit="item", disable=not settings.progress):
            rec, row = evaluate_one(ev, item, settings, prompts, media)
            records.append(rec)
            rows.append({**rec, **row})
        models = ev.models
    finally:
        if evaluator is None:
            ev.close()
    summary = summarize(records, models, settings, source, time.monotonic() - start)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(out_dir / "metrics.jsonl", lambda f: f.write(lines.encode("utf-8")))
    atomic_write(out_dir / "summary.json", lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode("utf-8")))
    if settings.report:
        page = render(summary, rows)
        atomic_write(out_dir / "index.html", lambda f: f.write(page.encode("utf-8")))
    if summary["n_errors"]:
        say(f"evaluate: {summary['n_errors']} of {summary['n_items']} items had errors (see metrics.jsonl 'error')")
    return summary
