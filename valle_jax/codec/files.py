"""Readers and writers for the reference's quantised-audio files (`.enc` for EnCodec/Vocos, `.dac` for DAC).

Such a file is what `np.save` writes for a 0-d object array holding a pickled dict:

    {"codes": uint16 [1, n_levels, T], "metadata": {...}}

despite the extension (it is an .npy file).  The model uses the codes as `codes[0].T`, i.e. [T, n_levels]
int16, frame rows and level columns.

Reading never runs arbitrary pickled code: the pickle is read with an unpickler that only rebuilds numpy
arrays, numpy scalars and plain Python containers, so a corrupt or hostile file is refused with
`CodecFileError` instead of being executed.  No torch is needed here.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from valle_jax.fileio import atomic_write

__all__ = ["CodecFileError", "read_codes", "write_codes", "CODE_FILE_SUFFIXES"]

CODE_FILE_SUFFIXES = (".enc", ".dac")

# Globals that numpy's pickles of arrays, dtypes and scalars refer to (numpy 1.x and 2.x module names).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class CodecFileError(ValueError):
    """A quantised-audio file that is not what the reference writes (or is damaged)."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        # numpy's dtype classes (numpy.dtypes.UInt16DType, ...) appear in pickles written by numpy >= 1.25
        if module == "numpy.dtypes" and name.endswith("DType"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_payload(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            major, _minor = np.lib.format.read_magic(f)
        except ValueError as e:
            raise CodecFileError(path, f"not a NumPy .npy file ({e})") from None
        try:
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif major in (2, 3):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise CodecFileError(path, f"unsupported .npy format version {major}")
        except ValueError as e:
            raise CodecFileError(path, f"bad .npy header ({e})") from None
        if dtype != np.dtype(object) or shape != ():
            raise CodecFileError(
                path,
                f"expected a pickled dict (0-d object array), found an array of dtype {dtype} and shape {shape}",
            )
        try:
            obj = _RestrictedUnpickler(f).load()
        except CodecFileError:
            raise
        except Exception as e:  # truncated data, bad opcodes, refused globals ...
            raise CodecFileError(path, f"cannot unpickle the payload ({type(e).__name__}: {e})") from None
    # np.save of a 0-d object array pickles the array itself; unwrap it to the dict.
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj[()]
    return obj


def read_codes(
    path: os.PathLike | str, levels: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a reference `.enc` / `.dac` file.

    Returns `(codes, metadata)`: codes as np.int16 [T, n_levels] (frame rows, level columns, the layout the
    model uses), metadata as the stored dict (empty if absent).  `levels`, when given, is the number of levels
    the file must hold.  Raises `FileNotFoundError` for a missing file and `CodecFileError` for anything that
    is not a file of this kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"code file not found: {path}")
    payload = _load_payload(path)
    if not isinstance(payload, dict):
        raise CodecFileError(path, f"expected a dict with 'codes' and 'metadata', found {type(payload).__name__}")
    if "codes" not in payload:
        raise CodecFileError(path, f"no 'codes' entry (keys: {sorted(map(str, payload))})")
    codes = payload["codes"]
    if not isinstance(codes, np.ndarray):
        raise CodecFileError(path, f"'codes' is a {type(codes).__name__}, expected a numpy array")
    if not np.issubdtype(codes.dtype, np.integer):
        raise CodecFileError(path, f"'codes' has dtype {codes.dtype}, expected an integer dtype (uint16)")
    if codes.ndim == 2:  # tolerate a missing batch axis: [levels, T]
        codes = codes[None]
    if codes.ndim != 3 or codes.shape[0] != 1:
        raise CodecFileError(path, f"'codes' has shape {codes.shape}, expected [1, n_levels, T]")
    if codes.shape[1] == 0 or codes.shape[2] == 0:
        raise CodecFileError(path, f"'codes' is empty (shape {codes.shape})")
    if levels is not None and codes.shape[1] != levels:
        raise CodecFileError(path, f"'codes' has {codes.shape[1]} levels, expected {levels}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) > np.iinfo(np.int16).max):
        raise CodecFileError(
            path, f"code values out of range [{int(codes.min())}, {int(codes.max())}] (expected 0..32767)"
        )
    metadata = payload.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise CodecFileError(path, f"'metadata' is a {type(metadata).__name__}, expected a dict")
    return np.ascontiguousarray(codes[0].T.astype(np.int16)), dict(metadata)


def write_codes(
    path: os.PathLike | str,
    codes: np.ndarray,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write codes [T, n_levels] (any integer dtype, values 0..65535) as the reference does.

    The file is written under a temporary name in the same folder, flushed to disk and then renamed over
    `path`, so a reader never sees a half-written file.  Returns the path.
    """
    path = Path(path)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"codes must be a non-empty [T, n_levels] array, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if int(codes.min()) < 0 or int(codes.max()) > np.iinfo(np.uint16).max:
        raise ValueError(f"code values out of range for uint16: [{int(codes.min())}, {int(codes.max())}]")
    meta = dict(metadata) if metadata is not None else {}
    payload = {"codes": np.ascontiguousarray(codes.T[None].astype(np.uint16)), "metadata": meta}

    buf = io.BytesIO()
    np.save(buf, payload, allow_pickle=True)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path
