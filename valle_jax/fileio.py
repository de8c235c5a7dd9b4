"""Files: writing them so that nothing half-written is ever left under the final name, reading JSON lines (no jax,
no torch here)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], mode: int = 0o644) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes, read in chunks (weights files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), mode)


def jsonl_objects(text: str, where: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object, None) for each JSON-object line of `text`, (line number, None, error) for each
    other non-blank line; the error names `where:line`. Blank lines are skipped."""
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            yield n, None, f"{where}:{n}: not a JSON object ({e})"
            continue
        yield n, obj, None
