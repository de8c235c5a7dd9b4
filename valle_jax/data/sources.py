"""Finding the utterances to prepare: a LibriTTS-style folder tree or a CSV / JSONL manifest.

Tree: every audio file (.wav .flac .ogg .mp3 .opus) below the root, with its transcript beside it in
`<utt>.normalized.txt` (LibriTTS) or `<utt>.txt`.  The speaker is the folder two levels above the file
(`speaker/chapter/utt.wav`), or the parent folder for `speaker/utt.wav`; the id is the file's path below the
root without its extension (unique by construction).

Manifest: `.csv` (with a header row) or `.jsonl`, one utterance per row/line with the fields
`id`, `audio` (also accepted: `path`, `audio_path`, `file`, `wav`), `text`, `speaker` and optionally
`language`.  Relative audio paths are relative to the manifest's folder; a missing id becomes the audio
file's stem.

Problems found here (a missing transcript, a bad manifest line, a duplicate id) travel with the item as
`problem` and end up in rejected.jsonl like every other skipped input.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AUDIO_SUFFIXES", "SourceItem", "discover", "read_manifest", "scan_tree"]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")
TRANSCRIPT_SUFFIXES = (".normalized.txt", ".txt")
AUDIO_KEYS = ("audio", "path", "audio_path", "file", "wav")


@dataclass
class SourceItem:
    id: str
    audio: str
    text: str | None
    speaker: str
    language: str
    problem: str | None = None  # set when the item is to be rejected without reading it


def _dedupe(items: list[SourceItem]) -> list[SourceItem]:
    seen: set[str] = set()
    for it in items:
        if it.id in seen and it.problem is None:
            it.problem = "duplicate id (an earlier entry has the same id)"
        seen.add(it.id)
    return items


def scan_tree(root: str | Path, language: str = "en") -> list[SourceItem]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    items = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES):
        rel = path.relative_to(root)
        parts = rel.parts
        speaker = parts[-3] if len(parts) >= 3 else (parts[-2] if len(parts) == 2 else "default")
        uid = rel.with_suffix("").as_posix()
        text, problem = None, None
        for suffix in TRANSCRIPT_SUFFIXES:
            t = path.with_name(path.stem + suffix)
            if t.is_file():
                try:
                    text = t.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    problem = f"transcript {t.name} unreadable ({e})"
                break
        else:
            problem = f"no transcript ({path.stem}.normalized.txt or {path.stem}.txt)"
        items.append(SourceItem(uid, str(path), text, speaker, language, problem))
    return _dedupe(items)


def read_manifest(path: str | Path, language: str = "en") -> list[SourceItem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest")
    rows: list[tuple[int, dict | None, str | None]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                rows.append((n, {k.strip().lower(): v for k, v in row.items() if k is not None}, None))
    elif path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    rows.append((n, None, f"not valid JSON ({e})"))
                    continue
                if not isinstance(obj, dict):
                    rows.append((n, None, "not a JSON object"))
                    continue
                rows.append((n, {str(k).lower(): v for k, v in obj.items()}, None))
    else:
        raise ValueError(f"{path}: a manifest must be .csv or .jsonl")
    items = []
    for n, row, problem in rows:
        where = f"{path.name} line {n}"
        if row is None:
            items.append(SourceItem(f"{where}", str(path), None, "", language, problem))
            continue
        audio = next((str(row[k]) for k in AUDIO_KEYS if row.get(k)), "")
        uid = str(row.get("id") or (Path(audio).stem if audio else "") or where)
        speaker = str(row.get("speaker") or "").strip()
        text = row.get("text")
        lang = str(row.get("language") or row.get("lang") or language)
        if not audio:
            problem = f"{where}: no audio path (one of the fields {', '.join(AUDIO_KEYS)})"
        elif not speaker:
            problem = f"{where}: no speaker"
        elif text is None:
            problem = f"{where}: no text field"
        audio_path = Path(audio)
        if audio and not audio_path.is_absolute():
            audio_path = path.parent / audio_path
        items.append(SourceItem(uid, str(audio_path), None if text is None else str(text), speaker, lang, problem))
    return _dedupe(items)


def discover(src: str | Path, language: str = "en") -> list[SourceItem]:
    """A folder is scanned as a tree; a .csv / .jsonl file is read as a manifest."""
    src = Path(src)
    if src.is_dir():
        return scan_tree(src, language)
    if src.is_file():
        return read_manifest(src, language)
    raise FileNotFoundError(f"{src}: neither a folder of audio files nor a manifest file")
