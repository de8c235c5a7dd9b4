"""What to evaluate: a plain list (items.jsonl) or a finished synthesis job.

items.jsonl: one JSON object a line, {"id": "u1", "text": "...", "audio": "out/u1.wav",
"prompt": "ref.wav" | ["a.wav", "b.wav"] (optional), "language": "en" (optional)}.

A job folder DIR (`python -m valle_jax.synthesize --manifest M --out DIR`): DIR/results.jsonl says which ids
were made (status ok: DIR/<id>.wav) and which failed; the texts and prompts come from the manifest the job ran:
`manifest` if given, else DIR/manifest.jsonl.  Ids follow synthesize's rule ("id", else "line<N>").  Items
whose synthesis failed are carried along with that error.

Relative audio and prompt paths are taken from the current directory, as synthesize does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valle_jax.fileio import jsonl_objects


@dataclass(frozen=True)
class EvalItem:
    id: str
    text: str | None
    audio: str | None
    prompt: tuple[str, ...] = ()
    language: str | None = None
    error: str | None = None  # known bad before evaluation (bad line, failed synthesis)


class ItemsError(ValueError):
    """The list or job as a whole cannot be read (missing file, no manifest)."""


def _jsonl(path: Path) -> list[tuple[int, dict | None, str | None]]:
    return list(jsonl_objects(path.read_text(encoding="utf-8"), path))


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{where}: 'prompt' must be a path or a list of paths, got {value!r}")


def item_from_dict(obj: dict, where: str, default_id: str) -> EvalItem:
    """One item from a JSON object; a bad field gives an item with `error` set (never an exception)."""
    item_id = str(obj.get("id", default_id))
    try:
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: empty or missing 'text'")
        audio = obj.get("audio")
        if not isinstance(audio, str) or not audio:
            raise ValueError(f"{where}: missing 'audio' (the path of the audio to evaluate)")
        language = obj.get("language")
        if language is not None and not isinstance(language, str):
            raise ValueError(f"{where}: 'language' must be a string like 'en', got {language!r}")
        return EvalItem(item_id, text, audio, _prompts(obj.get("prompt"), where), language)
    except ValueError as e:
        return EvalItem(item_id, obj.get("text") if isinstance(obj.get("text"), str) else None,
                        obj.get("audio") if isinstance(obj.get("audio"), str) else None, (), None, str(e))  # fmt: skip


def _dedupe(items: list[EvalItem]) -> list[EvalItem]:
    seen: set[str] = set()
    out = []
    for it in items:
        if it.id in seen:
            it = EvalItem(f"{it.id}#dup{len(out)}", it.text, it.audio, it.prompt, it.language,
                          f"id {it.id!r} appears more than once")  # fmt: skip
        seen.add(it.id)
        out.append(it)
    return out


def load_items(path: str | Path) -> list[EvalItem]:
    """Items of an items.jsonl file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ItemsError(f"items file {path} not found")
    items = []
    for n, obj, error in _jsonl(path):
        if error:
            items.append(EvalItem(f"line{n}", None, None, (), None, error))
        else:
            items.append(item_from_dict(obj, f"{path}:{n}", f"line{n}"))
    return _dedupe(items)


def load_job(job_dir: str | Path, manifest: str | Path | None = None) -> list[EvalItem]:
    """Items of a finished synthesis job (see the module docstring), in results order."""
    job_dir = Path(job_dir)
    results_path = job_dir / "results.jsonl"
    if not results_path.is_file():
        raise ItemsError(f"{results_path} not found: is {job_dir} the --out folder of a synthesis job?")
    manifest_path = Path(manifest) if manifest is not None else job_dir / "manifest.jsonl"
    if not manifest_path.is_file():
        raise ItemsError(
            f"the job's manifest {manifest_path} not found: give --manifest M (the file the job ran) "
            f"or copy it to {job_dir / 'manifest.jsonl'}"
        )
    entries: dict[str, tuple[str, dict | None, str | None]] = {}
    for n, obj, error in _jsonl(manifest_path):
        item_id = str(obj.get("id", f"line{n}")) if obj else f"line{n}"
        entries.setdefault(item_id, (f"{manifest_path}:{n}", obj, error))

    last: dict[str, dict] = {}  # a rerun may append a newer line for an id: the last one wins
    for _n, rec, _error in _jsonl(results_path):
        if rec is not None and isinstance(rec.get("id"), str):
            last[rec["id"]] = rec
    items = []
    for item_id, rec in last.items():
        where, obj, error = entries.get(item_id, ("", None, f"id {item_id!r} is not in the manifest {manifest_path}"))
        if obj is None:
            items.append(EvalItem(item_id, None, None, (), None, error))
            continue
        text = obj.get("text") if isinstance(obj.get("text"), str) else None
        if rec.get("status") != "ok":
            items.append(EvalItem(item_id, text, None, (), None, f"synthesis failed: {rec.get('error', rec.get('status'))}"))
            continue
        if "codes" in obj and "prompt" not in obj:
            obj = {k: v for k, v in obj.items() if k != "codes"}  # a codes prompt has no audio to compare with
        items.append(item_from_dict({**obj, "id": item_id, "audio": str(job_dir / f"{item_id}.wav")}, where, item_id))
    return items
