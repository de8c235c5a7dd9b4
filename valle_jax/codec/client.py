"""`CodecClient`: the JAX side's handle on a codec running in a spawned torch process (the sidecar).

    with CodecClient("encodec") as codec:                 # pretrained weights from the torch hub cache
        codes = codec.encode([wav], sample_rate=16000)     # -> [np.int16 [T, 8]]
        fut = codec.decode_async(codes)                    # overlaps with whatever this process does next
        ...                                                # e.g. JAX generates the next batch
        audio = fut.result()                               # -> [np.float32 [T * 320]] at 24 kHz

    CodecClient("encodec", random_seed=0)                  # seeded random EnCodec (tests only; never a fallback)
    CodecClient("vocos", weights="path/to/vocos-encodec-24khz")   # EnCodec encodes, Vocos decodes
    CodecClient("dac", weights="path/to/weights_44khz_8kbps_0.0.1.pth")

The sidecar is started with the multiprocessing *spawn* context (so this process never imports torch and no
JAX state is forked).  As with any spawn-based multiprocessing, a script that uses the client must keep its
top-level work under `if __name__ == "__main__":`.

Requests run one at a time, in submission order, on one background thread; the synchronous methods are the
asynchronous ones plus `.result()`.  Every request has a deadline (`timeout`, per batch of `batch_size`
items): a sidecar that dies gives `CodecCrashError` at once, one that does not answer in time is killed and
gives `CodecTimeoutError` — never a hang.  With `auto_restart` (default) the next request starts a fresh
sidecar (at most `max_restarts` times).  Weights are resolved before anything is spawned: a missing file gives
`MissingWeightsError` naming it (see `weights.py`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Sequence

import numpy as np

from . import sidecar
from .specs import CODEC_SPECS, CodecSpec
from .weights import resolve_dac, resolve_encodec, resolve_vocos

__all__ = [
    "CodecClient",
    "CodecError",
    "CodecCrashError",
    "CodecTimeoutError",
    "CodecSpec",
    "CODEC_SPECS",
]

log = logging.getLogger(__name__)




class CodecError(RuntimeError):
    """The codec sidecar failed: it could not start, raised on a request, died, or hung."""

    def __init__(self, message: str, remote_traceback: str | None = None):
        super().__init__(message)
        self.remote_traceback = remote_traceback


class CodecCrashError(CodecError):
    """The sidecar process died (killed, crashed, out of memory) before it answered."""


class CodecTimeoutError(CodecError):
    """The sidecar gave no answer within the deadline; it has been killed."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class CodecClient:
    """A codec in a spawned torch sidecar process.  See the module docstring."""

    def __init__(
        self,
        kind: str = "encodec",
        weights: str | os.PathLike | None = None,
        *,
        encodec_weights: str | os.PathLike | None = None,
        random_seed: int | None = None,
        device: str = "cpu",
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
        if timeout <= 0 or start_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.kind = kind
        self.spec = spec
        self.levels = levels
        self.batch_size = int(batch_size)
        self.timeout = float(timeout)
        self.start_timeout = float(start_timeout)
        self.auto_restart = bool(auto_restart)
        self.max_restarts = int(max_restarts)
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
        self._config = config

        self.info: dict[str, Any] = {}
        self.restarts = 0
        self._lock = threading.RLock()
        self._proc = None
        self._conn = None
        self._spawned = False
        self._fatal: CodecError | None = None
        self._closed = False
        self._closing = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._worker_ident: int | None = None

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
    def pid(self) -> int | None:
        """The sidecar's process id, or None when none runs."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def is_alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.is_alive()

    # ----------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> "CodecClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "CodecClient":
        """Start the sidecar now (otherwise the first request starts it).  Blocks until the codec is loaded."""
        with self._lock:
            self._ensure_running()
        return self

    def close(self, wait: bool = True) -> None:
        """Stop the sidecar.  wait=True lets queued requests finish first; wait=False kills it at once and
        fails whatever is queued or running with CodecError."""
        if self._closed:
            return
        self._closing = True  # no new requests from here on
        if not wait:
            self._kill()
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=not wait)
        with self._lock:
            self._closed = True
            proc, conn = self._proc, self._conn
            if proc is not None and conn is not None and proc.is_alive():
                try:
                    conn.send(("close", None))
                    if conn.poll(5.0):
                        conn.recv()
                except (EOFError, OSError):
                    pass
                proc.join(5.0)
            self._stop_process()

    def restart(self) -> None:
        """Replace the sidecar with a fresh one (does not count against max_restarts)."""
        with self._lock:
            self._stop_process()
            self._fatal = None
            self._spawn()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()

    def _stop_process(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5.0)
            try:
                proc.close()
            except ValueError:
                pass
        if conn is not None:
            conn.close()

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=sidecar.serve,
            args=(child_end, self._config),
            name=f"codec-sidecar-{self.kind}",
            daemon=True,
        )
        proc.start()
        child_end.close()  # so that the child's death shows here as end-of-file
        self._proc, self._conn = proc, parent_end
        self._spawned = True
        try:
            reply = self._receive("start-up (importing torch and loading the codec)", self.start_timeout)
        except CodecError:
            self._stop_process()
            raise
        if reply[0] != "ready":
            self._stop_process()
            self._fatal = CodecError(f"codec sidecar ({self.kind}) failed to start: {reply[1]}", reply[2])
            raise self._fatal
        self.info = reply[1]
        log.info("codec sidecar %s started (pid %s)", self.kind, proc.pid)

    def _ensure_running(self) -> None:
        if self._closed:
            raise CodecError("this CodecClient is closed")
        if self._fatal is not None:
            raise self._fatal
        if self._proc is not None and self._proc.is_alive():
            return
        if self._proc is not None:
            code = self._proc.exitcode
            pid = self._proc.pid
            self._stop_process()
            log.warning("codec sidecar (pid %s) is gone (%s)", pid, _describe_exit(code))
        if self._spawned:
            if not self.auto_restart:
                raise CodecCrashError("the codec sidecar is not running (it died or was stopped) and auto_restart is off")
            if self.restarts >= self.max_restarts:
                raise CodecCrashError(f"the codec sidecar has been restarted {self.restarts} times; giving up")
            self.restarts += 1
            log.warning("restarting the codec sidecar (%d of at most %d)", self.restarts, self.max_restarts)
        self._spawn()

    # ----------------------------------------------------------------------------------------- transport

    def _receive(self, what: str, timeout: float) -> tuple:
        proc, conn = self._proc, self._conn
        assert proc is not None and conn is not None
        pid = proc.pid
        deadline = time.monotonic() + timeout
        after = " It will be restarted on the next request." if self.auto_restart else ""
        timed_out = threading.Event()

        def on_deadline() -> None:
            timed_out.set()
            if proc.is_alive():
                proc.kill()

        def timeout_error() -> CodecTimeoutError:
            self._stop_process()
            return CodecTimeoutError(
                f"the codec sidecar (pid {pid}) gave no answer to {what} within {timeout:g} s; it was killed.{after}"
            )

        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timeout_error()
            try:
                ready = conn.poll(min(remaining, 0.2))
            except (OSError, EOFError):
                ready = True  # recv below reports it
            if not ready and proc.is_alive():
                continue
            # Readable, or the process is gone (a last reply may still be buffered).  A watchdog bounds recv
            # even if the sidecar stalls in the middle of a long message.
            watchdog = threading.Timer(max(remaining, 0.0) + 1.0, on_deadline)
            watchdog.daemon = True
            watchdog.start()
            try:
                if ready or conn.poll(0):
                    return conn.recv()
            except (EOFError, OSError):
                pass
            finally:
                watchdog.cancel()
            if timed_out.is_set():
                raise timeout_error()
            proc.join(2.0)
            code = proc.exitcode
            self._stop_process()
            hint = ""
            if what.startswith("start-up"):
                hint = (
                    " (A script that starts a CodecClient must keep its top-level code under"
                    ' `if __name__ == "__main__":`: the spawned sidecar imports the main module again.)'
                )
            raise CodecCrashError(
                f"the codec sidecar (pid {pid}) died during {what} ({_describe_exit(code)}).{after}{hint}"
            )

    def _request(self, op: str, args: Any, timeout: float | None) -> Any:
        timeout = self.timeout if timeout is None else float(timeout)
        with self._lock:
            self._ensure_running()
            assert self._conn is not None and self._proc is not None
            try:
                self._conn.send((op, args))
            except (OSError, EOFError):
                pass  # the receive below reports the dead process
            reply = self._receive(f"the {op} request", timeout)
        if reply[0] == "ok":
            return reply[1]
        raise CodecError(f"the codec sidecar ({self.kind}) failed on {op}: {reply[1]}", reply[2])

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        if self._closing or self._closed:
            raise CodecError("this CodecClient is closed")
        if threading.get_ident() == self._worker_ident:  # called from a callback on the worker: run inline
            future: concurrent.futures.Future = concurrent.futures.Future()
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001
                future.set_exception(e)
            return future
        with self._lock:
            if self._executor is None:

                def remember_worker() -> None:
                    self._worker_ident = threading.get_ident()

                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"codec-{self.kind}", initializer=remember_worker
                )
        return self._executor.submit(fn, *args)

    # ----------------------------------------------------------------------------------------- requests

    def ping(self, timeout: float | None = None) -> int:
        """Round trip to the sidecar (starting it if needed); returns its pid."""
        return self._submit(self._request, "ping", None, timeout).result()

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
            if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] != self.levels:
                raise ValueError(f"codes {i}: expected shape [T >= 1, {self.levels}], got {c.shape}")
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
        """Decode codes [T, levels] to float32 waveforms at `sample_rate`.

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
