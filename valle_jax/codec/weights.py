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

Every weights file found is checked against the sha256 of the published file (`PUBLISHED`), whatever its name
or folder: a damaged download or another model's weights would otherwise give wrong codes or audio without a
word.  A mismatch is `WeightsChecksumError` naming the file, the expected and the actual digest.  Weights of
your own (a fine-tuned codec, the random stand-ins of the tests) need the check turned off explicitly:
`verify=False` here, or the environment variable VALLE_JAX_UNVERIFIED_CODEC_WEIGHTS=1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from valle_jax.fileio import sha256_file as sha256_of

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
    "PUBLISHED",
    "UNVERIFIED_WEIGHTS_ENV",
    "sha256_of",
    "verify_published",
]

ENCODEC_CHECKPOINT = "encodec_24khz-d7cc33bc.th"
ENCODEC_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + ENCODEC_CHECKPOINT
VOCOS_REPO = "charactr/vocos-encodec-24khz"
VOCOS_FILES = ("config.yaml", "pytorch_model.bin")
DAC_CHECKPOINT = "weights_44khz_8kbps_0.0.1.pth"
DAC_URL = "https://github.com/descriptinc/descript-audio-codec/releases/download/0.0.1/weights.pth"
UNVERIFIED_WEIGHTS_ENV = "VALLE_JAX_UNVERIFIED_CODEC_WEIGHTS"


@dataclass(frozen=True)
class PublishedFile:
    """A codec weights file as its authors publish it: the sha256 accepted, and where that digest is stated."""

    what: str
    sha256: str
    source: str
    superseded: tuple[str, ...] = ()  # digests of earlier published revisions (refused, with a specific hint)


PUBLISHED = {
    # The file name carries the digest's first 8 hex digits (torch hub's check_hash convention); the whole
    # digest is the one pinned by projects that verify this download, and begins with those digits.
    "encodec": PublishedFile(
        f"EnCodec 24 kHz weights {ENCODEC_CHECKPOINT}",
        "d7cc33bcf1aad7f2dad9836f36431530744abeace3ca033005e3290ed4fa47bf",
        ENCODEC_URL,
    ),
    # Git LFS pointer of pytorch_model.bin at revision 4e61d08 ("Update model weights", October 2023), what
    # `Vocos.from_pretrained` has fetched since and what the reference decodes with.  The first upload
    # (79e727a, June 2023) differs.
    "vocos": PublishedFile(
        f"Vocos {VOCOS_REPO} pytorch_model.bin",
        "7e95bb260b74a1bfc43c52d355831c951acb81c8960e9c62b79bd2b3ab1e3a90",
        f"https://huggingface.co/{VOCOS_REPO}/blob/main/pytorch_model.bin",
        superseded=("258052d0ff62159a04ce32ba417e980476ca1b01451e9907204f4fa5fbac4f00",),
    ),
    # The 0.0.1 release asset (306,717,287 bytes); descript's own Hugging Face upload of it
    # (descript/descript-audio-codec weights.pth) has the same Git LFS digest.
    "dac": PublishedFile(
        f"DAC 44 kHz 8 kbps weights 0.0.1 ({DAC_CHECKPOINT})",
        "a88eed82a7024ccc1facdb1e605c4c2f99281c8118c22c9895ffa846d8fb61aa",
        DAC_URL,
    ),
}


class MissingWeightsError(FileNotFoundError):
    """A codec's weights file is not where it was looked for."""

    def __init__(self, what: str, path: Path | str, hint: str):
        self.what = what
        self.path = str(path)
        super().__init__(f"{what} not found: expected the file {self.path}. {hint}")


class WeightsChecksumError(ValueError):
    """A weights file whose content is not the published file's (sha256 differs)."""


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


def _verification_on(verify: bool | None) -> bool:
    """`verify` when given; otherwise on unless VALLE_JAX_UNVERIFIED_CODEC_WEIGHTS=1."""
    if verify is not None:
        return bool(verify)
    value = os.environ.get(UNVERIFIED_WEIGHTS_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return True
    if value in ("1", "true", "yes"):
        return False
    raise ValueError(f"{UNVERIFIED_WEIGHTS_ENV}={value!r}: expected 1 (skip the weights checksum) or 0")


def verify_published(path: Path, kind: str, verify: bool | None = None) -> None:
    """Raise WeightsChecksumError unless `path` is the published weights file of codec `kind`.

    `verify=False` (or VALLE_JAX_UNVERIFIED_CODEC_WEIGHTS=1 when `verify` is None) skips the check.
    """
    if not _verification_on(verify):
        return
    published = PUBLISHED[kind]
    digest = sha256_of(path)
    if digest == published.sha256:
        return
    why = ("an earlier revision of the published file, not the one the reference uses"
           if digest in published.superseded else "the file is damaged or incomplete, or other weights")  # fmt: skip
    raise WeightsChecksumError(
        f"{path}: sha256 {digest} is not that of the published {published.what}: expected {published.sha256} "
        f"({published.source}); {why}. Download it again, or, for weights of your own, turn the check off with "
        f"{UNVERIFIED_WEIGHTS_ENV}=1"
    )


def resolve_encodec(weights: os.PathLike | str | None, verify: bool | None = None) -> Path:
    """The EnCodec 24 kHz checkpoint: `weights` (file, or folder holding the canonical file) or the hub cache,
    checked against the published sha256 (see `verify_published`)."""
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
    verify_published(path, "encodec", verify)
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


def resolve_vocos(weights: os.PathLike | str | None, verify: bool | None = None) -> VocosFiles:
    """config.yaml + pytorch_model.bin of charactr/vocos-encodec-24khz, from `weights` (a folder) or the HF cache;
    pytorch_model.bin checked against the published sha256 (see `verify_published`)."""
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
    verify_published(folder / VOCOS_FILES[1], "vocos", verify)
    return VocosFiles(config=folder / VOCOS_FILES[0], model=folder / VOCOS_FILES[1])


def resolve_dac(weights: os.PathLike | str | None, verify: bool | None = None) -> Path:
    """The DAC 44 kHz 8 kbps checkpoint: `weights` (file or folder holding the canonical file) or dac's cache,
    checked against the published sha256 (see `verify_published`)."""
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
    verify_published(path, "dac", verify)
    return path
