"""Fetch the real EnCodec 24 kHz and Vocos weights into the caches valle_jax reads, when a network exists.

    python tools/fetch_codec_weights.py [--probe-timeout 10] [--skip-vocos]

Run by tools/setup.sh.  One short try first: when the weights' host cannot be reached within
--probe-timeout seconds the script says "offline" and exits 0 at once (the demo then uses the seeded random
codec, as it says).  Otherwise:
- EnCodec: `encodec_24khz-d7cc33bc.th` from its published URL into `$TORCH_HOME/hub/checkpoints/`, checked
  against its published sha256 (valle_jax.codec.weights.PUBLISHED), as valle_jax checks it on load;
- Vocos: `config.yaml` + `pytorch_model.bin` of charactr/vocos-encodec-24khz into the Hugging Face cache;
  the weights checked against their published sha256 (PUBLISHED), the config against the git blob id the hub
  publishes for it.
Files already present and valid are not fetched again.  Nothing half-written is left under a final name.
Exit status 0 unless a downloaded file fails its hash (1): a network failure is reported and tolerated.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from valle_jax.codec.weights import (  # noqa: E402
    ENCODEC_CHECKPOINT,
    ENCODEC_URL,
    VOCOS_FILES,
    VOCOS_REPO,
    WeightsChecksumError,
    resolve_vocos,
    torch_hub_dir,
    verify_published,
)


def say(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def reachable(url: str, timeout: float) -> str | None:
    """None when `url` answers within `timeout` seconds, else the reason."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError as e:  # an HTTP answer: the network works
        return None if e.code < 500 else f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))


def download(url: str, dest: Path, timeout: float) -> Path:
    """`url` to a temporary file beside `dest` (with progress); the caller checks it and renames it."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, os.fdopen(fd, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def fetch_encodec(timeout: float) -> bool:
    dest = torch_hub_dir() / "checkpoints" / ENCODEC_CHECKPOINT
    if dest.is_file():
        try:
            verify_published(dest, "encodec", verify=True)
            say(f"EnCodec weights present: {dest}")
            return True
        except WeightsChecksumError as e:
            say(f"replacing a damaged file: {e}")
    tmp = download(ENCODEC_URL, dest, timeout)
    try:
        verify_published(tmp, "encodec", verify=True)
    except WeightsChecksumError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    say(f"EnCodec weights: {dest} (the published sha256)")
    return True


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fetch_vocos(timeout: float) -> bool:
    try:
        files = resolve_vocos(None)
        say(f"Vocos weights present: {files.model.parent}")
        return True
    except FileNotFoundError:
        pass
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout)))
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(VOCOS_REPO, files_metadata=True)
    published = {s.rfilename: s for s in info.siblings}
    for name in VOCOS_FILES:
        path = Path(hf_hub_download(VOCOS_REPO, name, revision=info.sha))
        try:
            if name == "pytorch_model.bin":
                verify_published(path, "vocos", verify=True)
            elif published[name].blob_id != _git_blob_sha1(path):
                raise WeightsChecksumError(f"{VOCOS_REPO}/{name}: git blob {_git_blob_sha1(path)} is not the "
                                           f"published {published[name].blob_id}")  # fmt: skip
        except WeightsChecksumError:
            path.unlink(missing_ok=True)
            raise
        say(f"Vocos {name}: {path} (the published hash)")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe-timeout", type=float, default=10.0, help="seconds for the one network probe (10)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a download may stall before it fails (60)")
    ap.add_argument("--skip-vocos", action="store_true")
    args = ap.parse_args(argv)
    reason = reachable(ENCODEC_URL, args.probe_timeout)
    if reason is not None:
        say(f"offline ({reason}): real codec weights not fetched; the demo and tests use the seeded random codec")
        return 0
    status = 0
    for name, fetch in (("EnCodec", fetch_encodec), ("Vocos", None if args.skip_vocos else fetch_vocos)):
        if fetch is None:
            continue
        try:
            fetch(args.timeout)
        except WeightsChecksumError as e:
            say(f"{name} weights REFUSED: {e}")
            status = 1
        except Exception as e:  # noqa: BLE001 - a network problem must not stop the set-up
            say(f"{name} weights not fetched ({type(e).__name__}: {e}); going on without them")
    return status


if __name__ == "__main__":
    sys.exit(main())
