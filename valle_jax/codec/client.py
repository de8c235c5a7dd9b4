"""`CodecClient`: the JAX side's handle on a codec running in a spawned torch process (the sidecar).

    with CodecClient("encodec") as codec:                 # pretrained weights from the torch hub cache
        codes = codec.encode([wav], sample_rate=16000)     # -> [np.int16 [T, 8]]
        fut = codec.decode_async(codes)                    # overlaps with whatever this process does next
        ...                                                # e.g. JAX generates the next batch
        audio = fut.result()                               # -> [np.float32 [T * 320]] at 24 kHz

    CodecClient("encodec", random_seed=0)                  # seeded random EnCodec (tests only; never a fallback)
    CodecClient("vocos", weights="path/to/vocos-encodec-24khz")   # EnCodec encodes, Vocos decodes
    CodecClient("dac", weights="path/to/weights_44khz_8kbps_0.0.1.pth")
    CodecClient("encodec", device="cpu")                   # default "auto": the first CUDA GPU torch sees, else the CPU

Decoding takes the first L' <= `levels` levels of the codes (`decode_levels(n)` says how many of n levels made
the decoder uses: any count for EnCodec and DAC, 2/4/8/16 for Vocos), so a synthesis that made fewer levels
decodes exactly those, never zero-filled ones.

The sidecar is started with the multiprocessing *spawn* context (so this process never imports torch and no
JAX state is forked).  As with any spawn-based multiprocessing, a script that uses the client must keep its
top-level work under `if __name__ == "__main__":`.

Requests run one at a time, in submission order, on one background thread; the synchronous methods are the
asynchronous ones plus `.result()`.  Every request has a deadline (`timeout`, per batch of `batch_size`
items): a sidecar that dies gives `CodecCrashError` at once, one that does not answer in time is killed and
gives `CodecTimeoutError` — never a hang.  With `auto_restart` (default) the next request starts a fresh
sidecar (at most `max_restarts` times).  Weights are resolved before anything is spawned: a missing file gives
`MissingWeightsError` naming it (see `weights.py`).  The process machinery (spawn, handshake, deadlines,
restarts) is the generic `valle_jax.worker.SpawnedWorker`; the child's side is `sidecar.CodecService`.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Any, Sequence

import numpy as np

from ..worker import SpawnedWorker, WorkerCrashError, WorkerError, WorkerTimeoutError
from .specs import CODEC_SPECS, CodecSpec
from .weights import resolve_dac, resolve_encodec, resolve_vocos

__all__ = [
    "CodecClient",
    "share_gpu_with_codec",
    "CodecError",
    "CodecCrashError",
    "CodecTimeoutError",
    "CodecSpec",
    "CODEC_SPECS",
]


JAX_GPU_MEMORY_FRACTION = 0.85  # of the GPU for JAX when the codec sidecar runs on the same GPU


def share_gpu_with_codec(device: str, fraction: float = JAX_GPU_MEMORY_FRACTION) -> bool:
    """Let JAX preallocate only `fraction` of the GPU when the codec sidecar may run on it (`device` "auto" or
    "cuda..."), so the sidecar's torch finds room: sets XLA_PYTHON_CLIENT_MEM_FRACTION unless the user set it.
    Call before JAX's first computation (JAX reads it once); returns whether it set it."""
    if device == "cpu" or "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ:
        return False
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(fraction)
    return True


class CodecError(WorkerError):
    """The codec sidecar failed: it could not start, raised on a request, died, or hung."""


class CodecCrashError(CodecError, WorkerCrashError):
    """The sidecar process died (killed, crashed, out of memory) before it answered."""


class CodecTimeoutError(CodecError, WorkerTimeoutError):
    """The sidecar gave no answer within the deadline; it has been killed."""


class CodecClient(SpawnedWorker):
    """A codec in a spawned torch sidecar process.  See the module docstring."""

    error_class = CodecError
    crash_class = CodecCrashError
    timeout_class = CodecTimeoutError

    def __init__(
        self,
        kind: str = "encodec",
        weights: str | os.PathLike | None = None,
        *,
        encodec_weights: str | os.PathLike | None = None,
        random_seed: int | None = None,
        device: str = "auto",  # "cpu", "cuda", "cuda:N" or "auto" (resolved in the sidecar)
        levels: int | None = None,
        batch_size: int = 16,
        timeout: float = 600.0,
        start_timeout: float = 300.0,
        auto_restart: bool = True,
        max_restarts: int = 3,
        num_threads: int | None = None,
    ):
        if kind not in CODEC_SPECS:
            raise ValueError(f"kind must be one of {sorted(CODEC_SPECS)}, got {kind!r}")
        spec = CODEC_SPECS[kind]
        levels = spec.levels if levels is None else int(levels)
        if levels not in spec.allowed_levels:
            raise ValueError(f"{kind} supports levels {spec.allowed_levels}, got {levels}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not isinstance(device, str) or not (device in ("cpu", "auto", "cuda") or device.startswith("cuda:")):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
        if timeout <= 0 or start_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.kind = kind
        self.spec = spec
        self.levels = levels
        self.batch_size = int(batch_size)
        self.random_seed = None if random_seed is None else int(random_seed)

        config: dict[str, Any] = {
            "kind": kind,
            "levels": levels,
            "device": device,
            "batch_size": self.batch_size,
            "random_seed": self.random_seed,
            "num_threads": num_threads,
        }
        if self.random_seed is None:  # resolve now: a missing file is reported before anything is spawned
            if kind == "encodec":
                config["encodec_path"] = str(resolve_encodec(weights))
            elif kind == "vocos":
                files = resolve_vocos(weights)
                config["vocos_config"], config["vocos_model"] = str(files.config), str(files.model)
                config["encodec_path"] = str(resolve_encodec(encodec_weights))
            else:
                config["dac_path"] = str(resolve_dac(weights))
        elif weights is not None or encodec_weights is not None:
            raise ValueError("pass either weights or random_seed, not both")
        super().__init__(
            "valle_jax.codec.sidecar:CodecService",
            config,
            label="codec sidecar",
            title=f"codec sidecar ({kind})",
            owner="CodecClient",
            loading="importing torch and loading the codec",
            thread_name=f"codec-sidecar-{kind}",
            timeout=timeout,
            start_timeout=start_timeout,
            auto_restart=auto_restart,
            max_restarts=max_restarts,
        )

    # ----------------------------------------------------------------------------------------- properties

    @property
    def sample_rate(self) -> int:
        """The rate of decoded audio (and the rate audio is converted to before encoding)."""
        return self.spec.sample_rate

    @property
    def hop_length(self) -> int:
        """Samples per code frame at `sample_rate`."""
        return self.spec.hop_length

    @property
    def device(self) -> str:
        """Where the codec runs: what "auto" resolved to once the sidecar started, else the device asked for."""
        return str(self.info.get("device", self._config["device"]))

    def decode_levels(self, made: int) -> int:
        """How many of `made` code levels `decode` uses (ValueError when the decoder cannot take so few)."""
        return self.spec.decode_levels(min(int(made), self.levels))

    def __enter__(self) -> "CodecClient":
        return self.start()

    # ----------------------------------------------------------------------------------------- requests

    def _check_waves(self, waves: Sequence[np.ndarray], sample_rate) -> tuple[list[np.ndarray], list[int]]:
        if isinstance(waves, np.ndarray):
            raise TypeError("encode takes a list of 1-D waveforms, not one array")
        waves = [np.ascontiguousarray(np.asarray(w, dtype=np.float32)) for w in waves]
        if np.ndim(sample_rate) == 0:
            rates = [int(sample_rate)] * len(waves)
        else:
            rates = [int(r) for r in sample_rate]
            if len(rates) != len(waves):
                raise ValueError(f"{len(waves)} waveforms but {len(rates)} sample rates")
        for i, (w, r) in enumerate(zip(waves, rates)):
            if w.ndim != 1 or w.shape[0] == 0:
                raise ValueError(f"waveform {i}: expected a non-empty mono [samples] array, got shape {w.shape}")
            if not np.all(np.isfinite(w)):
                raise ValueError(f"waveform {i}: holds NaN or inf")
            if r <= 0:
                raise ValueError(f"waveform {i}: bad sample rate {r}")
        return waves, rates

    def _check_codes(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        if isinstance(codes, np.ndarray):
            raise TypeError("decode takes a list of [T, levels] code arrays, not one array")
        out = []
        for i, c in enumerate(codes):
            c = np.asarray(c)
            if c.ndim != 2 or c.shape[0] == 0 or not 1 <= c.shape[1] <= self.levels:
                raise ValueError(f"codes {i}: expected shape [T >= 1, L <= {self.levels}], got {c.shape}")
            if c.shape[1] not in self.spec.decodable_levels:
                raise ValueError(f"codes {i}: {self.kind} decodes {self.spec.decodable_levels} levels, got {c.shape[1]}")
            if not np.issubdtype(c.dtype, np.integer):
                raise ValueError(f"codes {i}: expected integers, got dtype {c.dtype}")
            lo, hi = int(c.min()), int(c.max())
            if lo < 0 or hi >= self.spec.codebook_size:
                raise ValueError(f"codes {i}: values must be in [0, {self.spec.codebook_size}), got [{lo}, {hi}]")
            out.append(np.ascontiguousarray(c.astype(np.int16)))
        return out

    def _encode_all(self, waves, rates, return_metadata, timeout):
        results: list = []
        for start in range(0, len(waves), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            results.extend(self._request("encode", (waves[chunk], rates[chunk]), timeout))
        return results if return_metadata else [codes for codes, _metadata in results]

    def _decode_all(self, codes, lengths, timeout):
        out: list[np.ndarray] = []
        for start in range(0, len(codes), self.batch_size):
            out.extend(self._request("decode", codes[start : start + self.batch_size], timeout))
        if lengths is not None:
            out = [w if n is None else w[: int(n)] for w, n in zip(out, lengths)]
        return out

    def encode_async(
        self,
        waves: Sequence[np.ndarray],
        sample_rate: int | Sequence[int],
        *,
        return_metadata: bool = False,
        timeout: float | None = None,
    ) -> concurrent.futures.Future:
        """Future of `encode(...)`."""
        waves, rates = self._check_waves(waves, sample_rate)
        return self._submit(self._encode_all, waves, rates, return_metadata, timeout)

    def encode(
        self,
        waves: Sequence[np.ndarray],
        sample_rate: int | Sequence[int],
        *,
        return_metadata: bool = False,
        timeout: float | None = None,
    ) -> list:
        """Encode mono float waveforms (any rate; one rate for all or one per waveform) to codes.

        Each clip is encoded on its own, as the reference does, to np.int16 [T, levels] with
        T = ceil(samples at the codec rate / hop_length).  With return_metadata, items are (codes, metadata)
        with the metadata the reference stores in `.enc`/`.dac` files (original_length, sample_rate, and for
        DAC input_db, chunk_length, channels, padding, dac_version).
        """
        return self.encode_async(waves, sample_rate, return_metadata=return_metadata, timeout=timeout).result()

    def decode_async(
        self,
        codes: Sequence[np.ndarray],
        *,
        lengths: Sequence[int | None] | None = None,
        timeout: float | None = None,
    ) -> concurrent.futures.Future:
        """Future of `decode(...)`: lets decoding overlap with work in this process (e.g. JAX generation)."""
        codes = self._check_codes(codes)
        if lengths is not None and len(lengths) != len(codes):
            raise ValueError(f"{len(codes)} code arrays but {len(lengths)} lengths")
        return self._submit(self._decode_all, codes, lengths, timeout)

    def decode(
        self,
        codes: Sequence[np.ndarray],
        *,
        lengths: Sequence[int | None] | None = None,
        timeout: float | None = None,
    ) -> list[np.ndarray]:
        """Decode codes [T, L] (the first L <= levels levels; see `decode_levels`) to float32 waveforms at
        `sample_rate`.

        EnCodec/Vocos return T * 320 samples, DAC its raw decoder output; `lengths` trims item i to
        lengths[i] samples (None keeps it whole).  Items are batched (up to batch_size; Vocos and DAC, whose
        decoders look ahead, only batch items of equal length so padding never changes the audio).
        """
        return self.decode_async(codes, lengths=lengths, timeout=timeout).result()

    def frames_for(self, num_samples: int, sample_rate: int | None = None) -> int:
        """Code frames that `encode` gives for a clip of num_samples at sample_rate (EnCodec/Vocos exact)."""
        if sample_rate is not None and sample_rate != self.sample_rate:
            num_samples = math.ceil(num_samples * self.sample_rate / sample_rate)
        return math.ceil(num_samples / self.hop_length)
