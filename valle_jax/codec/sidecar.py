"""The codec sidecar's service: what the spawned worker process (`valle_jax.worker.serve`) runs for a
`CodecClient`.  Built in the child only; torch is imported there, never in the process that starts it.

Requests: ("encode", (waves, rates)) -> [codes or (codes, metadata)] and ("decode", codes) -> [waveforms];
"ping" and "close" are answered by the worker loop itself.
"""

from __future__ import annotations

from typing import Any


class CodecService:
    def __init__(self, config: dict[str, Any]):
        import torch

        if config.get("num_threads"):
            torch.set_num_threads(int(config["num_threads"]))
        from . import _backends

        self.codec = _backends.build(config)

    def info(self) -> dict[str, Any]:
        return self.codec.info()

    def handle(self, op: str, args: Any) -> Any:
        if op == "encode":
            waves, rates = args
            return [self.codec.encode(w, sr) for w, sr in zip(waves, rates)]
        if op == "decode":
            return self.codec.decode(args)
        raise ValueError(f"unknown request {op!r}")
