"""The codec sidecar: the body of the spawned process that owns the torch codec.

`serve` runs in the child only; torch is imported there, never in the process that starts it.  Protocol over
one duplex `multiprocessing` connection, one request at a time:

    child  -> ("ready", info)                 after the model is built (or ("error", message, traceback))
    parent -> (op, args)                      op: "encode" | "decode" | "ping" | "close"
    child  -> ("ok", result) | ("error", message, traceback)

An exception inside a request is sent back and the sidecar keeps serving.  The child ignores SIGINT (the
parent decides when it stops), exits when the parent closes its end, and exits if the parent disappears.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from typing import Any


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def serve(conn, config: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        import torch

        if config.get("num_threads"):
            torch.set_num_threads(int(config["num_threads"]))
        from . import _backends

        codec = _backends.build(config)
        info = {**codec.info(), "pid": os.getpid()}
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as text
        try:
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        finally:
            conn.close()
        return
    conn.send(("ready", info))

    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            break  # the parent closed its end or died
        if op == "close":
            conn.send(("ok", None))
            break
        try:
            if op == "encode":
                waves, rates = args
                result: Any = [codec.encode(w, sr) for w, sr in zip(waves, rates)]
            elif op == "decode":
                result = codec.decode(args)
            elif op == "ping":
                result = os.getpid()
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as e:  # noqa: BLE001
            reply: tuple = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
        else:
            reply = ("ok", result)
        try:
            conn.send(reply)
        except (BrokenPipeError, EOFError, OSError):
            break
    conn.close()
