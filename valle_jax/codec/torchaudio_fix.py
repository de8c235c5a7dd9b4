"""Make `import torchaudio` (and so `import encodec` / `vocos` / `dac`) work beside a CPU-only torch.

    python -m valle_jax.codec.torchaudio_fix            # check, and repair if needed
    python -m valle_jax.codec.torchaudio_fix --check    # only check (exit 1 if broken)

Why: encodec 0.1.1 imports torchaudio at import time, and every torchaudio wheel on PyPI for x86_64 links
CUDA libraries (libc10_cuda.so, libtorch_cuda.so).  Beside the CPU build of torch its native extension fails
to load (`OSError: Could not load this library: .../torchaudio/lib/_torchaudio.abi3.so`) and so does
`import torchaudio`.  torchaudio treats *absent* extension files as "built without the extension" and then
runs in pure-Python mode, where everything the codecs use works (transforms.Resample, MelSpectrogram,
functional.*).  What needs the extension or torchcodec (torchaudio.load/save, sox effects, CTC decoders) is
not used: valle_jax reads and writes audio with soundfile.

What it does: runs `import torchaudio` in a child interpreter; only if that fails because the native
extension cannot be loaded, deletes the extension files (torchaudio/lib/*.so) and checks again that
torchaudio, its Resample and `import encodec` work.  Where torchaudio already imports (a CUDA torch that
matches it, or an already repaired install) it changes nothing.  `pip uninstall torchaudio` still works
after it.  It never imports torch in this process.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import torch, torchaudio
from torchaudio._extension import _IS_TORCHAUDIO_EXT_AVAILABLE as ext
y = torchaudio.transforms.Resample(16000, 24000)(torch.zeros(1, 1600))
assert y.shape == (1, 2400), y.shape
try:
    import encodec
    has_encodec = True
except ImportError:
    has_encodec = False
print(f"torch {torch.__version__}, torchaudio {torchaudio.__version__} "
      f"({'native extension' if ext else 'pure-Python mode'}), encodec importable: {has_encodec}")
"""

EXTENSION_SIGNS = ("torchaudio/lib", "libc10_cuda", "libtorch_cuda", "_torchaudio", "libtorchaudio", "libcudart")


def _torchaudio_dir() -> Path | None:
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _probe(python: str) -> tuple[bool, str]:
    proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; change nothing")
    args = parser.parse_args(argv)

    folder = _torchaudio_dir()
    if folder is None:
        print("torchaudio is not installed: pip install torch==2.13.0 torchaudio==2.11.0", file=sys.stderr)
        return 2
    ok, out = _probe(sys.executable)
    if ok:
        print(f"ok: {out.splitlines()[-1]}")
        return 0
    tail = "\n".join(out.splitlines()[-3:])
    if not any(sign in out for sign in EXTENSION_SIGNS):
        print(f"torchaudio fails for a reason other than its native extension:\n{out}", file=sys.stderr)
        return 1
    libs = sorted((folder / "lib").glob("*.so"))
    if args.check:
        print(f"broken: torchaudio's native extension does not load:\n{tail}\n"
              f"run `python -m valle_jax.codec.torchaudio_fix` to remove {len(libs)} file(s) from {folder / 'lib'}",
              file=sys.stderr)
        return 1
    if not libs:
        print(f"torchaudio fails but has no extension files to remove:\n{out}", file=sys.stderr)
        return 1
    print(f"torchaudio's native extension does not load beside this torch:\n{tail}")
    for lib in libs:
        print(f"removing {lib}")
        lib.unlink()
    ok, out = _probe(sys.executable)
    if not ok:
        print(f"still broken after removing the extension:\n{out}", file=sys.stderr)
        return 1
    print(f"ok: {out.splitlines()[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
