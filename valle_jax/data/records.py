"""The on-disk layout of a prepared dataset, and its one writer.

A prepared dataset is a folder:

    dataset.json        settings fixed at creation (codec, levels, frames/s, tokenizer, random codec?)
    shards/shard-NNNNN.array_record
                        ArrayRecord files, one record per utterance (`encode_record`), each written under a
                        temporary name and renamed when complete
    ledger.jsonl        one line per finished shard: its name and the utterances it holds (the progress file:
                        a rerun skips every id listed here or in rejected.jsonl)
    rejected.jsonl      one line per skipped input: id, file, reason
    metadata.json       what the input pipeline reads: the shards in order and, per split and speaker, the ids,
                        durations, texts, record indices and lengths; rewritten atomically at the end of a run

A record is an uncompressed `.npz` (no pickle) with the arrays `text_ids` (uint8, or uint16 for a vocabulary
over 256) and `codes` (int16 [T, Q]) and `meta`, a 0-d string of JSON: id, speaker, text, phonemes, language,
duration.  `decode_record` gives the dict back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from valle_jax.fileio import atomic_write_text

__all__ = [
    "DATASET_FORMAT",
    "DatasetError",
    "DatasetWriter",
    "Utterance",
    "atomic_write_text",
    "decode_record",
    "encode_record",
    "load_metadata",
    "read_jsonl",
    "shard_paths",
]

log = logging.getLogger(__name__)

DATASET_FORMAT = "valle_jax-dataset-v1"
SHARD_DIR = "shards"
SHARD_SUFFIX = ".array_record"
SPLITS = ("train", "eval")


class DatasetError(RuntimeError):
    """A prepared dataset folder is missing, damaged, or was made with other settings."""


@dataclass
class Utterance:
    """One prepared utterance (what a record holds)."""

    id: str
    speaker: str
    text: str
    phonemes: str
    language: str
    text_ids: np.ndarray  # [n] token ids incl. BOS/EOS
    codes: np.ndarray  # int16 [T, Q]
    duration: float  # seconds of the source audio
    source: str = ""  # the file it came from (for reports)
    split: str | None = None  # "train" / "eval" when the source says so; None = held-out fraction decides


# ----------------------------------------------------------------------------------------------- records


def encode_record(utt: Utterance) -> bytes:
    ids = np.asarray(utt.text_ids)
    if ids.ndim != 1:
        raise ValueError(f"{utt.id}: text_ids must be 1-D, got shape {ids.shape}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(np.uint16).max):
        raise ValueError(f"{utt.id}: text ids out of range")
    ids = ids.astype(np.uint8 if (ids.size == 0 or int(ids.max()) < 256) else np.uint16)
    codes = np.asarray(utt.codes)
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise ValueError(f"{utt.id}: codes must be a non-empty [T, Q] array, got shape {codes.shape}")
    meta = {
        "id": utt.id,
        "speaker": utt.speaker,
        "text": utt.text,
        "phonemes": utt.phonemes,
        "language": utt.language,
        "duration": float(utt.duration),
    }
    buf = io.BytesIO()
    np.savez(buf, text_ids=ids, codes=codes.astype(np.int16), meta=np.array(json.dumps(meta, ensure_ascii=False)))
    return buf.getvalue()


def decode_record(data: bytes) -> dict[str, Any]:
    """A record's dict: id, speaker, text, phonemes, language, duration, text_ids, codes (int16 [T, Q])."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        out = json.loads(str(z["meta"][()]))
        out["text_ids"] = z["text_ids"]
        out["codes"] = z["codes"]
    return out


# ----------------------------------------------------------------------------------------------- files

def read_jsonl(path: Path) -> list[dict]:
    """Every complete JSON object line of `path` (a torn last line from a crash is ignored)."""
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: ignoring a damaged line (an interrupted run?)", path)
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def _append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_metadata(path: str | os.PathLike) -> dict:
    """The metadata.json of a prepared dataset folder (DatasetError with a clear message otherwise)."""
    root = Path(path)
    meta_path = root / "metadata.json"
    if not meta_path.is_file():
        hint = " (prepare one with `python -m valle_jax.prepare`)" if root.exists() else ""
        raise DatasetError(f"{root}: not a prepared dataset, {meta_path} is missing{hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{meta_path}: not valid JSON ({e})") from e
    if meta.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{meta_path}: format {meta.get('format')!r}, expected {DATASET_FORMAT!r}")
    return meta


def shard_paths(root: str | os.PathLike, meta: dict) -> list[str]:
    root = Path(root)
    paths = [root / SHARD_DIR / s["name"] for s in meta["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{root}: shard file(s) missing: {', '.join(missing[:5])}")
    return [str(p) for p in paths]


def eval_score(uid: str) -> float:
    """A stable pseudo-random number in [0, 1) per id: the held-out split takes the smallest ones."""
    h = hashlib.sha1(uid.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


# ----------------------------------------------------------------------------------------------- writer


class DatasetWriter:
    """Creates or resumes a prepared dataset folder; the one place that writes shards, ledger and metadata.

        with DatasetWriter(out, settings, shard_size=512) as w:
            for utt in ...:
                if w.is_done(utt_id): continue
                w.add(utt)                       # or w.reject(id, file, reason)
        # closing finalizes the last shard and writes metadata.json

    `settings` (codec, levels, frames_per_second, tokenizer, ...) are stored in dataset.json on creation and
    must match on every rerun (one dataset holds one kind of codes and one tokenisation).  A lock file keeps
    two writers off one folder.  Shards that no ledger line names (a crash between the rename and the ledger
    append) and temporary files are deleted on open; their utterances are simply redone.
    """

    # settings that must be equal on a rerun
    FIXED_KEYS = ("codec", "levels", "frames_per_second", "tokenizer", "random_codec")

    def __init__(self, root: str | os.PathLike, settings: dict, *, shard_size: int = 512,
                 eval_fraction: float = 0.02, retry_rejected: bool = False):  # fmt: skip
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        self.root = Path(root)
        self.shard_size = int(shard_size)
        self.eval_fraction = float(eval_fraction)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SHARD_DIR).mkdir(exist_ok=True)
        self._lock_file = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise DatasetError(f"{self.root}: another preparation is writing this folder (lock held)") from None
        try:
            self.settings = self._settings(settings)
            self.ledger_path = self.root / "ledger.jsonl"
            self.rejected_path = self.root / "rejected.jsonl"
            self._shards: list[dict] = []  # ledger lines, in order
            self._done: set[str] = set()
            for line in read_jsonl(self.ledger_path):
                if "shard" in line and isinstance(line.get("items"), list):
                    self._shards.append(line)
                    self._done.update(it["id"] for it in line["items"])
            self._rejected: dict[str, dict] = {}
            for line in read_jsonl(self.rejected_path):
                if "id" in line:
                    self._rejected[line["id"]] = line
            if retry_rejected:
                self._rejected.clear()
                if self.rejected_path.exists():
                    self.rejected_path.rename(self.rejected_path.with_suffix(".jsonl.old"))
            self._clean_orphans()
            names = [s["shard"] for s in self._shards]
            self._next_shard = 1 + max([int(n.split("-")[1].split(".")[0]) for n in names] + [-1])
            self._pending: list[Utterance] = []
            self.added = 0
            self.rejected_now = 0
            self.reasons: Counter[str] = Counter()
            self._closed = False
        except BaseException:
            self._release()
            raise

    # --------------------------------------------------------------------------------------- settings

    def _settings(self, settings: dict) -> dict:
        path = self.root / "dataset.json"
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            for key in self.FIXED_KEYS:
                if key in settings and settings[key] != old.get(key):
                    raise DatasetError(
                        f"{self.root}: was prepared with {key}={old.get(key)!r}, this run asks for "
                        f"{key}={settings[key]!r}; use another output folder (one dataset holds one kind of codes "
                        "and one tokenisation)"
                    )
            return old
        settings = {"format": DATASET_FORMAT, **settings}
        atomic_write_text(path, json.dumps(settings, indent=1, ensure_ascii=False) + "\n")
        return settings

    def _clean_orphans(self) -> None:
        known = {s["shard"] for s in self._shards}
        for p in (self.root / SHARD_DIR).iterdir():
            if p.name in known:
                continue
            if p.name.endswith(".tmp") or p.name.endswith(SHARD_SUFFIX):
                log.info("removing %s (left by an interrupted run; its utterances are redone)", p)
                p.unlink()
        for s in self._shards:
            if not (self.root / SHARD_DIR / s["shard"]).is_file():
                raise DatasetError(f"{self.root}: ledger names shard {s['shard']}, which is missing; "
                                   "delete ledger.jsonl to start over")  # fmt: skip

    # --------------------------------------------------------------------------------------- progress

    def is_done(self, uid: str) -> bool:
        """Already in a finished shard, or rejected by an earlier run (or this one)."""
        return uid in self._done or uid in self._rejected

    @property
    def done_ids(self) -> set[str]:
        return set(self._done)

    @property
    def rejected(self) -> dict[str, dict]:
        return dict(self._rejected)

    def reject(self, uid: str, file: str, reason: str) -> None:
        entry = {"id": uid, "file": str(file), "reason": reason}
        self._rejected[uid] = entry
        self.rejected_now += 1
        self.reasons[reason.split(":")[0].split("(")[0].strip()[:60]] += 1
        _append_jsonl(self.rejected_path, entry)
        log.info("skipped %s (%s): %s", uid, file, reason)

    def add(self, utt: Utterance) -> None:
        if utt.id in self._done:
            raise DatasetError(f"duplicate utterance id {utt.id!r}")
        self._pending.append(utt)
        self._done.add(utt.id)
        self.added += 1
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending utterances as one shard (temporary name, fsync, rename) and log it in the ledger."""
        if not self._pending:
            return
        from array_record.python.array_record_module import ArrayRecordWriter

        name = f"shard-{self._next_shard:05d}{SHARD_SUFFIX}"
        final = self.root / SHARD_DIR / name
        tmp = final.with_name(final.name + ".tmp")
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        try:
            for utt in self._pending:
                writer.write(encode_record(utt))
        finally:
            writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        items = [
            {"id": u.id, "speaker": u.speaker, "text": u.text, "phonemes": u.phonemes, "language": u.language,
             "duration": round(float(u.duration), 4), "frames": int(u.codes.shape[0]), "text_len": int(len(u.text_ids)),
             "source": u.source, **({"split": u.split} if u.split else {})}
            for u in self._pending
        ]  # fmt: skip
        line = {"shard": name, "items": items}
        _append_jsonl(self.ledger_path, line)
        self._shards.append(line)
        self._next_shard += 1
        self._pending = []

    # --------------------------------------------------------------------------------------- metadata

    def metadata(self) -> dict:
        """metadata.json's content, from the ledger: shards in order, then per split and speaker the columns
        ids, durations, texts, languages, indices (global record index), frames, text_lens (phonemes are in
        the records and the ledger)."""
        shards, flat = [], []
        for s in self._shards:
            shards.append({"name": s["shard"], "records": len(s["items"])})
            flat.extend(s["items"])
        index = {it["id"]: i for i, it in enumerate(flat)}
        explicit = {it["id"]: it["split"] for it in flat if it.get("split") in SPLITS}
        free = sorted((eval_score(it["id"]), it["id"]) for it in flat if it["id"] not in explicit)
        n_eval = 0
        if self.eval_fraction > 0 and len(free) > 1:
            n_eval = min(len(free) - 1, max(1, round(self.eval_fraction * len(free))))
        held_out = {uid for _, uid in free[:n_eval]}
        splits: dict[str, dict[str, dict[str, list]]] = {s: {} for s in SPLITS}
        columns = ("ids", "durations", "texts", "languages", "indices", "frames", "text_lens")
        for it in sorted(flat, key=lambda x: (x["speaker"], x["id"])):
            split = explicit.get(it["id"]) or ("eval" if it["id"] in held_out else "train")
            spk = splits[split].setdefault(it["speaker"], {c: [] for c in columns})
            for c, v in zip(columns, (it["id"], it["duration"], it["text"], it["language"], index[it["id"]],
                                      it["frames"], it["text_len"])):  # fmt: skip
                spk[c].append(v)
        counts = {s: sum(len(v["ids"]) for v in splits[s].values()) for s in SPLITS}
        hours = {s: round(sum(sum(v["durations"]) for v in splits[s].values()) / 3600.0, 4) for s in SPLITS}
        return {
            **self.settings,
            "format": DATASET_FORMAT,
            "shards": shards,
            "counts": {**counts, "rejected": len(self._rejected)},
            "hours": hours,
            "eval_fraction": self.eval_fraction,
            "splits": splits,
        }

    def write_metadata(self) -> dict:
        meta = self.metadata()
        path = self.root / "metadata.json"
        text = json.dumps(meta, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
        return meta

    # --------------------------------------------------------------------------------------- lifecycle

    def close(self, write_metadata: bool = True) -> dict | None:
        if self._closed:
            return None
        try:
            self.flush()
            return self.write_metadata() if write_metadata else None
        finally:
            self._closed = True
            self._release()

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error the finished utterances are still kept (shard + ledger): the rerun resumes after them.
        self.close(write_metadata=exc_type is None)


def iter_items(meta: dict, split: str) -> Iterable[dict]:
    """Flat per-utterance dicts of one split of a metadata.json (speaker, id, duration, index, frames, ...)."""
    for speaker, cols in meta["splits"].get(split, {}).items():
        for i in range(len(cols["ids"])):
            yield {"speaker": speaker, "id": cols["ids"][i], "duration": cols["durations"][i],
                   "text": cols["texts"][i], "index": cols["indices"][i], "frames": cols["frames"][i],
                   "text_len": cols["text_lens"][i]}  # fmt: skip
