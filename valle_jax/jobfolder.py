"""The output folder of a synthesis job (`python -m valle_jax.synthesize --manifest M --out DIR`): who may write
it, and what is done in it.  No jax, no torch here.

    DIR/.lock               held (flock) by the job running on DIR; names it: pid, host, start time
    DIR/results.jsonl       one JSON object a line, {"id", "status": "ok" | "error", ...}; the last line of an id
                            is its state.  Rewritten with exactly one line per id (manifest order first) when a
                            run starts and when it ends, so a torn line of a killed run never stays.
    DIR/results.p<K>.jsonl  the lines of process K of a multi-process job while it runs (one writer per file,
                            also on network file systems); folded into results.jsonl at the end, or by the next
                            run after a kill.
    DIR/<id>.wav            written under a temporary name `.<id>.wav.<random>.tmp`, then renamed; temporary
                            files of a killed run are removed when the next run starts.
    DIR/manifest.jsonl      a copy of the manifest the job ran (what `python -m valle_jax.evaluate --job` reads).

An error line carries `kind`: "permanent" (bad input: a rerun skips it; `--retry-errors` tries it again) or
"transient" (the codec sidecar crashed or timed out, memory ran out: a rerun tries it again).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from valle_jax.fileio import atomic_write_text

LOCK_NAME = ".lock"
RESULTS_NAME = "results.jsonl"
MANIFEST_NAME = "manifest.jsonl"
_PART = re.compile(r"results\.p(\d+)\.jsonl")
# atomic_write's temporary names: "." + final name + "." + mkstemp's random part + ".tmp"
_TEMP = re.compile(r"\..+\.(wav|jsonl)\.[A-Za-z0-9_]+\.tmp")


class JobLockedError(RuntimeError):
    """Another job holds the folder's lock."""


# ---------------------------------------------------------------------------------------------------------
# the lock


def _describe(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


@dataclass
class JobLock:
    """The lock of one job on its folder (see `acquire`); `release()` removes it."""

    path: Path
    fd: int
    info: dict
    stale: dict | None  # what the lock file said when it was taken over from a job that is gone

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held, so nobody can hold the unlinked file
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "JobLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire(out_dir: Path, **extra: Any) -> JobLock:
    """Take DIR/.lock for this process, or raise JobLockedError naming the job that holds it.

    The lock is an flock(2) on the file: the kernel drops it when its process dies, however it dies, so the
    lock of a killed job is simply taken over (`JobLock.stale` then holds what that job had written).
    """
    path = out_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            info = _read_info(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise JobLockedError(f"{out_dir} is in use by another job ({_describe(info)}; lock file {path}): wait "
                                 "for it to end or give another --out") from None  # fmt: skip
        try:  # the holder before us may have unlinked the file between our open and flock: then start over
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        old = _read_info(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **extra}  # fmt: skip
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        os.fsync(fd)
        return JobLock(path, fd, info, old or None)


def describe_stale(stale: dict) -> str:
    return f"took over the lock of an earlier job that is gone ({_describe(stale)})"


# ---------------------------------------------------------------------------------------------------------
# temporary files


def remove_stale_temp_files(out_dir: Path) -> list[str]:
    """Remove the temporary files a killed run left (`.<name>.wav.<random>.tmp` and the like); their names.
    Only called while holding the lock, so no run of this job is writing them."""
    removed = []
    for p in out_dir.iterdir():
        if _TEMP.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


# ---------------------------------------------------------------------------------------------------------
# results


def read_records(path: Path) -> list[dict]:
    """The records of a results file, in order; torn or foreign lines (a killed write) are ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str) and rec.get("status") in ("ok", "error"):
            out.append(rec)
    return out


def part_files(out_dir: Path) -> list[Path]:
    """The results files of the processes of a multi-process run, by process index."""
    parts = [(int(m.group(1)), p) for p in out_dir.glob("results.p*.jsonl") if (m := _PART.fullmatch(p.name))]
    return [p for _, p in sorted(parts)]


def part_path(out_dir: Path, process: int, processes: int) -> Path:
    """Where process `process` of `processes` appends its records (results.jsonl itself for one process)."""
    return out_dir / (RESULTS_NAME if processes == 1 else f"results.p{process}.jsonl")


def job_state(out_dir: Path) -> dict[str, dict]:
    """The state of each id: its last record in results.jsonl, then in the process files."""
    state: dict[str, dict] = {}
    for path in [out_dir / RESULTS_NAME, *part_files(out_dir)]:
        for rec in read_records(path):
            state.pop(rec["id"], None)  # re-inserted: the order of the dict is the order of last records
            state[rec["id"]] = rec
    return state


def compact(out_dir: Path, order: Sequence[str]) -> dict[str, dict]:
    """Rewrite results.jsonl with exactly one line per id (its state): the ids of `order` (the manifest) first,
    in that order, then any others; the process files are folded in and removed.  Returns the state."""
    state = job_state(out_dir)
    known = [i for i in dict.fromkeys(order) if i in state]
    seen = set(known)
    rest = [i for i in state if i not in seen]
    parts = part_files(out_dir)
    text = "".join(json.dumps(state[i], ensure_ascii=False) + "\n" for i in [*known, *rest])
    path = out_dir / RESULTS_NAME
    if not state and not path.exists():
        return state
    atomic_write_text(path, text)
    for p in parts:
        p.unlink(missing_ok=True)
    return state


class ResultsWriter:
    """Appends records to one results file, each line written whole and synced (a kill tears at most one)."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def is_done(rec: dict | None, out_dir: Path, retry_errors: bool = False) -> bool:
    """Whether a run skips an id in this state: ok with its wav present, or a permanent error (unless retried)."""
    if rec is None:
        return False
    if rec["status"] == "ok":
        return (out_dir / f"{rec['id']}.wav").is_file()
    return rec.get("kind", "permanent") == "permanent" and not retry_errors


def tally(state: dict[str, dict], ids: Iterable[str], out_dir: Path) -> dict[str, int]:
    """Counts over every id of the manifest: ok, error (permanent), transient, pending (no result yet)."""
    counts = {"ok": 0, "error": 0, "transient": 0, "pending": 0}
    for i in dict.fromkeys(ids):
        rec = state.get(i)
        if rec is None or (rec["status"] == "ok" and not (out_dir / f"{i}.wav").is_file()):
            counts["pending"] += 1
        elif rec["status"] == "ok":
            counts["ok"] += 1
        else:
            counts["transient" if rec.get("kind") == "transient" else "error"] += 1
    return counts
