"""Codec implementations.  This module imports torch: only the sidecar process (and tests that build
weight files) import it; the rest of `valle_jax.codec` stays torch-free.

EnCodec  encode as the reference does: mono, `encodec.utils.convert_audio` to 24 kHz (torchaudio Resample),
         bandwidth = 0.75 kbps per level (6.0 for 8), one `encode` call on the whole clip, frames
         concatenated -> [1, L, T] -> [T, L] int16.  Decode: `decode([(codes, None)])` -> T * 320 samples.
Vocos    encode with the EnCodec above; decode `codes_to_features` then `decode(features, bandwidth_id)`
         with bandwidth_id 0/1/2/3 for 2/4/8/16 levels.
DAC      44.1 kHz, 9 levels: encode through `DAC.compress(signal, win_duration=None)` (whole clip as one
         window, loudness normalised to -16 dB LUFS); decode codes -> `quantizer.from_codes` -> `decode`,
         the raw decoder output (no loudness restore, no trim), as the reference does without metadata.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from valle_jax.codec.specs import CODEC_SPECS


@contextlib.contextmanager
def _quiet_weight_norm():
    """EnCodec and DAC build their layers with torch.nn.utils.weight_norm, which warns that it is deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*weight_norm.*deprecated", category=FutureWarning)
        yield


KBPS_PER_LEVEL = 0.75  # 1024-entry codebooks (10 bits) at 75 frames/s
VOCOS_BANDWIDTHS = [1.5, 3.0, 6.0, 12.0]

# The published architecture of charactr/vocos-encodec-24khz (its config.yaml), used to build a random Vocos.
VOCOS_ENCODEC_24KHZ_CONFIG = {
    "feature_extractor": {
        "class_path": "vocos.feature_extractors.EncodecFeatures",
        "init_args": {"encodec_model": "encodec_24khz", "bandwidths": VOCOS_BANDWIDTHS, "train_codebooks": False},
    },
    "backbone": {
        "class_path": "vocos.models.VocosBackbone",
        "init_args": {
            "input_channels": 128,
            "dim": 384,
            "intermediate_dim": 1152,
            "num_layers": 8,
            "adanorm_num_embeddings": 4,
        },
    },
    "head": {
        "class_path": "vocos.heads.ISTFTHead",
        "init_args": {"dim": 384, "n_fft": 1280, "hop_length": 320, "padding": "same"},
    },
}

TORCHAUDIO_HINT = (
    "torchaudio's native extension cannot be loaded beside this torch (the PyPI torchaudio wheels link CUDA "
    "libraries). Run `python -m valle_jax.codec.torchaudio_fix` once: it removes the extension files so "
    "torchaudio runs in its pure-Python mode, which is all EnCodec/Vocos/DAC need here."
)


def _import_or_explain(name: str):
    try:
        return __import__(name)
    except OSError as e:
        if "torchaudio" in str(e) or "libc10" in str(e) or "libtorch" in str(e):
            raise ImportError(f"import {name} failed: {e}. {TORCHAUDIO_HINT}") from e
        raise
    except ImportError as e:
        package = {"encodec": "encodec==0.1.1", "vocos": "vocos==0.1.0", "dac": "descript-audio-codec==1.0.0"}
        raise ImportError(
            f"import {name} failed ({e}); install {package.get(name, name)} (see valle_jax/codec/__init__.py)"
        ) from e


def _to_numpy_codes(codes: torch.Tensor) -> np.ndarray:
    """[L, T] tensor -> [T, L] int16."""
    return np.ascontiguousarray(codes.t().to(torch.int16).cpu().numpy())


def _by_levels(codes_list: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of the items with the same number of levels, per level count (in first-seen order)."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(codes_list):
        groups.setdefault(int(c.shape[1]), []).append(i)
    return list(groups.values())


def _batches(lengths: Sequence[int], batch_size: int, equal_lengths: bool) -> list[list[int]]:
    """Index groups to decode together: sorted by length; only equal lengths together when `equal_lengths`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if (
            groups
            and len(groups[-1]) < batch_size
            and (not equal_lengths or lengths[groups[-1][0]] == lengths[i])
        ):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


# ----------------------------------------------------------------------------------------------- EnCodec


@torch.no_grad()
def _seed_codebooks(model, seed: int) -> None:
    """Give a freshly built (random) EnCodec usable random codebooks, deterministically for `seed`.

    Its codebooks start at zero and are k-means-initialised only in training, so every code would be 0.  Plain
    N(0, 1) entries do not help either: a random-init encoder's output is a nearly constant vector (per-frame
    variation ~1e-3 around a norm of ~0.3), so one entry wins every frame.  Each level's entries are therefore
    drawn as Gaussians with the per-channel mean and spread of that level's residual on a seeded probe signal
    (noise with a rising envelope plus a chirp); `inited` is set to 1 so the quantizer uses them as they are.
    """
    gen = torch.Generator().manual_seed(seed)
    n = 12000  # 0.5 s: enough frames for the statistics, cheap on a CPU
    t = torch.arange(n, dtype=torch.float32) / CODEC_SPECS["encodec"].sample_rate
    envelope = torch.linspace(0.01, 0.8, n)
    probe = 0.3 * torch.randn(n, generator=gen) * envelope + 0.3 * torch.sin(2 * np.pi * (100 + 400 * t) * t)
    residual = model.encoder(probe.reshape(1, 1, n))[0].t()  # [frames, dim]
    for layer in model.quantizer.vq.layers:
        book = layer._codebook
        inner = layer.project_in(residual)
        mean, std = inner.mean(0), inner.std(0)
        book.embed.copy_(mean + std * torch.randn(book.embed.shape, generator=gen))
        book.embed_avg.copy_(book.embed)
        book.inited.fill_(1)
        residual = residual - layer.project_out(book.decode(book.encode(inner)))


@_quiet_weight_norm()
def build_encodec(weights_path: str | None, random_seed: int | None):
    """The EnCodec 24 kHz model, from a checkpoint file or (only when asked) seeded random weights."""
    encodec = _import_or_explain("encodec")
    if random_seed is not None:
        torch.manual_seed(random_seed)
        model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
        _seed_codebooks(model, random_seed)
    else:
        if weights_path is None:
            raise ValueError("EnCodec needs a weights path or a random seed")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
        model.load_state_dict(state)  # strict: a file of another model fails here, naming the keys
    model.eval()
    return model


class _Codec:
    """What every backend reports to the client (sent over the pipe: plain values only)."""

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sample_rate": self.sample_rate,
            "hop_length": self.hop_length,
            "levels": self.levels,
            "codebook_size": self.codebook_size,
            "device": str(self.device),
            "torch": str(torch.__version__),  # a str subclass that would import torch when unpickled
        }


class EncodecCodec(_Codec):
    kind = "encodec"
    sample_rate = CODEC_SPECS[kind].sample_rate
    hop_length = CODEC_SPECS[kind].hop_length
    codebook_size = CODEC_SPECS[kind].codebook_size
    causal = True  # right-padding codes does not change earlier samples: decode batches of mixed lengths

    def __init__(self, model, levels: int, device: str, batch_size: int):
        self.levels = levels
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.encodec = model.to(self.device)
        bandwidth = levels * KBPS_PER_LEVEL
        if bandwidth not in self.encodec.target_bandwidths:
            raise ValueError(
                f"EnCodec 24 kHz has no bandwidth for {levels} levels "
                f"(levels: {[int(b / KBPS_PER_LEVEL) for b in self.encodec.target_bandwidths]})"
            )
        self.encodec.set_target_bandwidth(bandwidth)


    @torch.inference_mode()
    def encode(self, wav: np.ndarray, sample_rate: int) -> tuple[np.ndarray, dict[str, Any]]:
        from encodec.utils import convert_audio

        x = torch.from_numpy(np.asarray(wav, dtype=np.float32)).reshape(1, -1)  # [channels=1, n]
        x = convert_audio(x, int(sample_rate), self.sample_rate, 1)
        frames = self.encodec.encode(x.unsqueeze(0).to(self.device))  # one call on the whole clip
        codes = torch.cat([c for c, _scale in frames], dim=-1)  # [1, L, T]
        metadata = {"original_length": int(wav.shape[-1]), "sample_rate": int(sample_rate)}
        return _to_numpy_codes(codes[0]), metadata

    def _decode_group(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, L, T] long (the first L levels) -> [B, samples] float."""
        return self.encodec.decode([(codes, None)])[:, 0]

    @torch.inference_mode()
    def decode(self, codes_list: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(codes_list)
        for members in _by_levels(codes_list):  # items of one level count decode together
            lengths = [int(codes_list[i].shape[0]) for i in members]
            for group in _batches(lengths, self.batch_size, equal_lengths=not self.causal):
                items = [members[j] for j in group]
                t_max = max(int(codes_list[i].shape[0]) for i in items)
                batch = torch.zeros((len(items), codes_list[items[0]].shape[1], t_max), dtype=torch.long)
                for row, i in enumerate(items):
                    batch[row, :, : codes_list[i].shape[0]] = torch.from_numpy(codes_list[i].astype(np.int64)).t()
                wav = self._decode_group(batch.to(self.device)).float().cpu().numpy()
                for row, i in enumerate(items):
                    out[i] = np.ascontiguousarray(wav[row, : codes_list[i].shape[0] * self.hop_length])
        return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- Vocos


@contextlib.contextmanager
def _vocos_gets_encodec(model):
    """While building a Vocos, hand its EncodecFeatures our already-loaded EnCodec instead of letting it fetch
    the pretrained one itself (which would read the torch hub cache or download)."""
    import vocos.feature_extractors as features

    class _Provider:
        @staticmethod
        def encodec_model_24khz(pretrained: bool = True, repository=None):
            return model

        @staticmethod
        def encodec_model_48khz(pretrained: bool = True, repository=None):
            raise ValueError("this sidecar provides only the 24 kHz EnCodec to Vocos")

    saved = features.EncodecModel
    features.EncodecModel = _Provider
    try:
        yield
    finally:
        features.EncodecModel = saved


@_quiet_weight_norm()
def build_vocos(encodec_model, config_path: str | None, model_path: str | None, random_seed: int | None):
    _import_or_explain("vocos")
    from vocos import Vocos
    from vocos.feature_extractors import EncodecFeatures
    from vocos.pretrained import instantiate_class

    with _vocos_gets_encodec(encodec_model):
        if random_seed is not None:
            torch.manual_seed(random_seed + 1)
            cfg = VOCOS_ENCODEC_24KHZ_CONFIG
            model = Vocos(
                feature_extractor=instantiate_class((), cfg["feature_extractor"]),
                backbone=instantiate_class((), cfg["backbone"]),
                head=instantiate_class((), cfg["head"]),
            )
        else:
            if config_path is None or model_path is None:
                raise ValueError("Vocos needs config.yaml + pytorch_model.bin or a random seed")
            model = Vocos.from_hparams(config_path)
            state = torch.load(model_path, map_location="cpu", weights_only=True)
            # The EnCodec inside Vocos is the pretrained EnCodec we loaded; whatever the file holds for it
            # is not used.
            state = {k: v for k, v in state.items() if not k.startswith("feature_extractor.encodec.")}
            result = model.load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if not k.startswith("feature_extractor.encodec.")]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"{model_path} does not match {config_path}: missing {missing[:5]}, "
                    f"unexpected {list(result.unexpected_keys)[:5]}"
                )
    if not isinstance(model.feature_extractor, EncodecFeatures):
        raise ValueError(f"{config_path}: this Vocos does not decode EnCodec codes (no EncodecFeatures)")
    model.eval()
    return model


class VocosCodec(EncodecCodec):
    kind = "vocos"
    causal = False  # ConvNeXt backbone + ISTFT: decode only equal lengths together

    def __init__(self, encodec_model, vocos_model, levels: int, device: str, batch_size: int):
        super().__init__(encodec_model, levels, device, batch_size)
        self.bandwidths = list(vocos_model.feature_extractor.bandwidths)
        self.bandwidth_id = self._bandwidth_id(levels)  # 2 for 8 levels
        self.vocos = vocos_model.to(self.device)

    def _bandwidth_id(self, levels: int) -> int:
        """Vocos is conditioned on the bandwidth of the codes it decodes: 2/4/8/16 levels -> id 0/1/2/3."""
        bandwidth = levels * KBPS_PER_LEVEL
        if bandwidth not in self.bandwidths:
            raise ValueError(f"Vocos has no bandwidth id for {levels} levels ({self.bandwidths} kbps)")
        return self.bandwidths.index(bandwidth)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "bandwidth_id": self.bandwidth_id}

    def _decode_group(self, codes: torch.Tensor) -> torch.Tensor:
        features = self.vocos.codes_to_features(codes.transpose(0, 1))  # [L, B, T] -> [B, C, T]
        bandwidth_id = torch.tensor([self._bandwidth_id(int(codes.shape[1]))], device=self.device)
        return self.vocos.decode(features, bandwidth_id=bandwidth_id)  # [B, T * 320]


# ----------------------------------------------------------------------------------------------- DAC


@_quiet_weight_norm()
def build_dac(weights_path: str | None, random_seed: int | None):
    dac = _import_or_explain("dac")
    if random_seed is not None:
        torch.manual_seed(random_seed)
        model = dac.DAC()  # the 44 kHz architecture: 9 codebooks x 1024, hop 512
    else:
        if weights_path is None:
            raise ValueError("DAC needs a weights path or a random seed")
        model = load_dac_checkpoint(dac.DAC, weights_path)
    model.eval()
    return model


def load_dac_checkpoint(dac_class, path: str):
    """A DAC weights file as descript-audio-codec's releases ship it (audiotools' plain save):
    {"state_dict": ..., "metadata": {"kwargs": constructor arguments, ...}}.  Loaded strictly, so a file of
    another model fails naming the keys.

    Only tensors and plain containers are unpickled (`weights_only=True`): the published 0.0.1 file pickles
    nothing else (OrderedDict, FloatStorage, _rebuild_tensor_v2), and a file that needs more is refused
    rather than allowed to run code."""
    import inspect
    import pickle

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: not loadable as DAC weights without running pickled code ({first}); the published DAC "
            "file holds only tensors and plain values: download it again"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a DAC weights file (expected a dict with 'state_dict' and 'metadata')")
    kwargs = dict((checkpoint.get("metadata") or {}).get("kwargs") or {})
    accepted = set(inspect.signature(dac_class).parameters)
    model = dac_class(**{k: v for k, v in kwargs.items() if k in accepted})
    model.load_state_dict(checkpoint["state_dict"])
    model.metadata = checkpoint.get("metadata") or {}
    return model


class DacCodec(_Codec):
    kind = "dac"
    codebook_size = CODEC_SPECS[kind].codebook_size

    def __init__(self, model, levels: int, device: str, batch_size: int):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.sample_rate = int(model.sample_rate)
        self.hop_length = int(model.hop_length)
        n_codebooks = int(model.n_codebooks)
        if not 1 <= levels <= n_codebooks:
            raise ValueError(f"DAC has {n_codebooks} codebooks, asked for {levels} levels")
        self.levels = levels
        self.batch_size = batch_size


    def encode(self, wav: np.ndarray, sample_rate: int) -> tuple[np.ndarray, dict[str, Any]]:
        from audiotools import AudioSignal

        signal = AudioSignal(torch.from_numpy(np.asarray(wav, dtype=np.float32)).reshape(1, 1, -1), int(sample_rate))
        signal = signal.to(self.device)
        packed = self.model.compress(signal, win_duration=None, normalize_db=-16, n_quantizers=self.levels)
        codes = packed.codes[0, : self.levels]  # [L, T]
        metadata = {
            "original_length": int(packed.original_length),
            "sample_rate": int(packed.sample_rate),
            "input_db": np.asarray(packed.input_db.cpu().numpy(), dtype=np.float32).reshape(-1),
            "chunk_length": int(packed.chunk_length),
            "channels": int(packed.channels),
            "padding": bool(packed.padding),
            "dac_version": str(packed.dac_version),
        }
        return _to_numpy_codes(codes), metadata

    @torch.inference_mode()
    def decode(self, codes_list: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(codes_list)
        for members in _by_levels(codes_list):  # from_codes sums the levels given
            lengths = [int(codes_list[i].shape[0]) for i in members]
            for group in _batches(lengths, self.batch_size, equal_lengths=True):
                items = [members[j] for j in group]
                batch = torch.stack([torch.from_numpy(codes_list[i].astype(np.int64)).t() for i in items])
                z = self.model.quantizer.from_codes(batch.to(self.device))[0]
                wav = self.model.decode(z)[:, 0].float().cpu().numpy()
                for row, i in enumerate(items):
                    out[i] = np.ascontiguousarray(wav[row])
        return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- factory


def resolve_device(device: str) -> str:
    """"auto": the first CUDA GPU when torch sees one, else the CPU; an explicit CUDA device must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"codec device {device!r}: torch sees no CUDA GPU here (torch {torch.__version__}); use "
                         "'cpu' or 'auto'")
    return device


def build(config: dict[str, Any]):
    """Build the codec a sidecar serves from the client's resolved configuration."""
    kind = config["kind"]
    seed = config.get("random_seed")
    levels = int(config["levels"])
    device = resolve_device(config.get("device", "cpu"))
    batch_size = int(config.get("batch_size", 16))
    if kind in ("encodec", "vocos"):
        encodec_model = build_encodec(config.get("encodec_path"), seed)
        if kind == "encodec":
            return EncodecCodec(encodec_model, levels, device, batch_size)
        vocos_model = build_vocos(encodec_model, config.get("vocos_config"), config.get("vocos_model"), seed)
        return VocosCodec(encodec_model, vocos_model, levels, device, batch_size)
    if kind == "dac":
        return DacCodec(build_dac(config.get("dac_path"), seed), levels, device, batch_size)
    raise ValueError(f"unknown codec kind {kind!r}")
