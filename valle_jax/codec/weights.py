"""Where each codec's pretrained weights are looked for (torch-free, so the client can fail fast).

Nothing is ever downloaded.  A file that is not where it is expected gives `MissingWeightsError`, which names
the file, where to put it and where it comes from.  Random weights are built only on explicit request
(`random_seed=N` in `CodecClient`), never as a fallback.

EnCodec 24 kHz   `$TORCH_HOME/hub/checkpoints/encodec_24khz-d7cc33bc.th` (torch hub's cache; TORCH_HOME
                 defaults to `$XDG_CACHE_HOME/torch`, i.e. `~/.cache/torch`), or `weights=FILE` / `weights=DIR`
                 (a folder holding `encodec_24khz-d7cc33bc.th`).
Vocos            a folder with `config.yaml` + `pytorch_model.bin` of `charactr/vocos-encodec-24khz`
                 (`weights=DIR`, or the Hugging Face cache `$HF_HUB_CACHE` / `$HF_HOME/hub` /
                 `~/.cache/huggingface/hub`), plus the EnCodec file above (`encodec_weights=` to override).
DAC 44 kHz       `~/.cache/descript/dac/weights_44khz_8kbps_0.0.1.pth` (descript-audio-codec's cache), or
                 `weights=FILE`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MissingWeightsError",
    "WeightsChecksumError",
    "ENCODEC_CHECKPOINT",
    "ENCODEC_URL",
    "VOCOS_REPO",
    "DAC_CHECKPOINT",
    "DAC_URL",
    "torch_hub_dir",
    "hf_hub_cache",
    "resolve_encodec",
    "resolve_vocos",
    "resolve_dac",
    "verify_sha256_prefix",
]

ENCODEC_CHECKPOINT = "encodec_24khz-d7cc33bc.th"
ENCODEC_SHA256_PREFIX = "d7cc33bc"
ENCODEC_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + ENCODEC_CHECKPOINT
VOCOS_REPO = "charactr/vocos-encodec-24khz"
VOCOS_FILES = ("config.yaml", "pytorch_model.bin")
DAC_CHECKPOINT = "weights_44khz_8kbps_0.0.1.pth"
DAC_URL = "https://github.com/descriptinc/descript-audio-codec/releases/download/0.0.1/weights.pth"


class MissingWeightsError(FileNotFoundError):
    """A codec's weights file is not where it was looked for."""

    def __init__(self, what: str, path: Path | str, hint: str):
        self.what = what
        self.path = str(path)
        super().__init__(f"{what} not found: expected the file {self.path}. {hint}")


class WeightsChecksumError(ValueError):
    """A weights file whose content does not match the checksum its name promises."""


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    torch_home = os.environ.get("TORCH_HOME")
    if not torch_home:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        torch_home = os.path.join(cache, "torch")
    return Path(os.path.expanduser(torch_home)) / "hub"


def hf_hub_cache() -> Path:
    """huggingface_hub's cache folder without importing it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expanduser(hf_home)) / "hub"


def verify_sha256_prefix(path: Path, prefix: str) -> None:
    """Raise WeightsChecksumError unless sha256(file) starts with `prefix` (torch hub's file-name convention)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if not digest.startswith(prefix):
        raise WeightsChecksumError(
            f"{path}: sha256 {digest[:16]}... does not start with {prefix}, the checksum in its name; "
            "the file is damaged or not the one expected (download it again)"
        )


def resolve_encodec(weights: os.PathLike | str | None) -> Path:
    """The EnCodec 24 kHz checkpoint: `weights` (file, or folder holding the canonical file) or the hub cache.

    The hub-cache file and a folder's canonical file are checked against the sha256 prefix in their name.
    """
    hint = (
        f"Download {ENCODEC_URL} and put it at that path (the torch hub cache: set TORCH_HOME to move it), "
        "or pass weights=/path/to/encodec_24khz-d7cc33bc.th. Random weights only with random_seed=N (tests)."
    )
    if weights is None:
        path = torch_hub_dir() / "checkpoints" / ENCODEC_CHECKPOINT
    else:
        path = Path(weights).expanduser()
        if path.is_dir():
            path = path / ENCODEC_CHECKPOINT
    if not path.is_file():
        raise MissingWeightsError("EnCodec 24 kHz weights", path, hint)
    if path.name == ENCODEC_CHECKPOINT:
        verify_sha256_prefix(path, ENCODEC_SHA256_PREFIX)
    return path


@dataclass(frozen=True)
class VocosFiles:
    config: Path
    model: Path


def _hf_snapshot(repo: str) -> Path | None:
    root = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    snapshots = root / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = root / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if all((candidate / f).is_file() for f in VOCOS_FILES):
            return candidate
    for candidate in sorted(snapshots.iterdir()):
        if all((candidate / f).is_file() for f in VOCOS_FILES):
            return candidate
    return None


def resolve_vocos(weights: os.PathLike | str | None) -> VocosFiles:
    """config.yaml + pytorch_model.bin of charactr/vocos-encodec-24khz, from `weights` (a folder) or the HF cache."""
    hint = (
        f"Get config.yaml and pytorch_model.bin of the Hugging Face model {VOCOS_REPO} "
        f"(https://huggingface.co/{VOCOS_REPO}) into one folder and pass weights=FOLDER, or have them in the "
        f"Hugging Face cache ({hf_hub_cache()}). Vocos also needs the EnCodec file {ENCODEC_CHECKPOINT}."
    )
    if weights is None:
        folder = _hf_snapshot(VOCOS_REPO)
        if folder is None:
            folder = hf_hub_cache() / ("models--" + VOCOS_REPO.replace("/", "--")) / "snapshots" / "<revision>"
            raise MissingWeightsError("Vocos weights", folder / VOCOS_FILES[0], hint)
    else:
        folder = Path(weights).expanduser()
        if folder.is_file():
            folder = folder.parent
    for name in VOCOS_FILES:
        if not (folder / name).is_file():
            raise MissingWeightsError("Vocos weights", folder / name, hint)
    return VocosFiles(config=folder / VOCOS_FILES[0], model=folder / VOCOS_FILES[1])


def resolve_dac(weights: os.PathLike | str | None) -> Path:
    """The DAC 44 kHz 8 kbps checkpoint: `weights` (file or folder holding the canonical file) or dac's cache."""
    hint = (
        f"Download {DAC_URL} and save it as that file (descript-audio-codec's cache), "
        "or pass weights=/path/to/weights.pth. Random weights only with random_seed=N (tests)."
    )
    if weights is None:
        path = Path(os.path.expanduser("~")) / ".cache" / "descript" / "dac" / DAC_CHECKPOINT
    else:
        path = Path(weights).expanduser()
        if path.is_dir():
            path = path / DAC_CHECKPOINT
    if not path.is_file():
        raise MissingWeightsError("DAC 44 kHz weights", path, hint)
    return path
