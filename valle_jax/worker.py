"""A torch model in a spawned worker process: the generic machinery behind the codec sidecar and the evaluator.

The parent side is `SpawnedWorker`; the child side is `serve`, which builds a *service* named by a
"module:callable" string and answers requests with it.  This module imports neither torch nor jax, so a
process that only starts workers never imports torch and no JAX state is forked (multiprocessing *spawn*).
As with any spawn-based multiprocessing, a script that starts a worker must keep its top-level work under
`if __name__ == "__main__":`.

Protocol over one duplex `multiprocessing` connection, one request at a time:

    child  -> ("ready", info)                 after the service is built (or ("error", message, traceback))
    parent -> (op, args)                      "ping" and "close" are answered here; every other op goes to
                                              service.handle(op, args)
    child  -> ("ok", result) | ("error", message, traceback)

A service is any object with `info() -> dict` and `handle(op, args) -> result`; its factory takes the
worker's config dict.  An exception inside a request is sent back and the worker keeps serving.  The child
ignores SIGINT (the parent decides when it stops), exits when the parent closes its end, and exits if the
parent disappears.

On the parent side requests run one at a time, in submission order, on one background thread; synchronous
calls are the asynchronous ones plus `.result()`.  Every request has a deadline: a worker that dies gives a
crash error at once, one that does not answer in time is killed and gives a timeout error, never a hang.
With `auto_restart` the next request starts a fresh worker (at most `max_restarts` times).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from typing import Any, Callable

__all__ = ["SpawnedWorker", "WorkerError", "WorkerCrashError", "WorkerTimeoutError", "describe_exit", "serve"]

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The worker failed: it could not start, raised on a request, died, or hung."""

    def __init__(self, message: str, remote_traceback: str | None = None):
        super().__init__(message)
        self.remote_traceback = remote_traceback


class WorkerCrashError(WorkerError):
    """The worker process died (killed, crashed, out of memory) before it answered."""


class WorkerTimeoutError(WorkerError):
    """The worker gave no answer within the deadline; it has been killed."""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ------------------------------------------------------------------------------------------------ child side


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def _load_factory(service: str) -> Callable[[dict], Any]:
    module, _, name = service.partition(":")
    return getattr(importlib.import_module(module), name)


def serve(conn, service: str, config: dict[str, Any]) -> None:
    """The body of the spawned process: build `service` (a "module:callable" factory) and answer requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        handler = _load_factory(service)(config)
        info = {**handler.info(), "pid": os.getpid()}
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
            result = os.getpid() if op == "ping" else handler.handle(op, args)
        except Exception as e:  # noqa: BLE001
            reply: tuple = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
        else:
            reply = ("ok", result)
        try:
            conn.send(reply)
        except (BrokenPipeError, EOFError, OSError):
            break
    conn.close()


# ----------------------------------------------------------------------------------------------- parent side


class SpawnedWorker:
    """The parent's handle on one spawned worker process running `service`.  See the module docstring.

    Subclasses (CodecClient, the evaluator's client) name themselves for messages and may narrow the error
    classes: `label` ("codec sidecar"), `title` ("codec sidecar (encodec)", for start and request failures),
    `owner` (the class users create, for "this X is closed"), `loading` (what start-up does).
    """

    error_class: type[WorkerError] = WorkerError
    crash_class: type[WorkerCrashError] = WorkerCrashError
    timeout_class: type[WorkerTimeoutError] = WorkerTimeoutError

    def __init__(
        self,
        service: str,
        config: dict[str, Any],
        *,
        label: str,
        title: str,
        owner: str,
        loading: str,
        thread_name: str,
        timeout: float,
        start_timeout: float,
        auto_restart: bool = True,
        max_restarts: int = 3,
    ):
        if timeout <= 0 or start_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.timeout = float(timeout)
        self.start_timeout = float(start_timeout)
        self.auto_restart = bool(auto_restart)
        self.max_restarts = int(max_restarts)
        self._service = service
        self._config = config
        self._label, self._title, self._owner, self._loading = label, title, owner, loading
        self._thread_name = thread_name

        self.info: dict[str, Any] = {}
        self.restarts = 0
        self._lock = threading.RLock()
        self._proc = None
        self._conn = None
        self._spawned = False
        self._fatal: WorkerError | None = None
        self._closed = False
        self._closing = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._worker_ident: int | None = None

    # ----------------------------------------------------------------------------------------- properties

    @property
    def pid(self) -> int | None:
        """The worker's process id, or None when none runs."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def is_alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.is_alive()

    # ----------------------------------------------------------------------------------------- lifecycle

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self):
        """Start the worker now (otherwise the first request starts it).  Blocks until the service is built."""
        with self._lock:
            self._ensure_running()
        return self

    def close(self, wait: bool = True) -> None:
        """Stop the worker.  wait=True lets queued requests finish first; wait=False kills it at once and
        fails whatever is queued or running."""
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
        """Replace the worker with a fresh one (does not count against max_restarts)."""
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
            target=serve,
            args=(child_end, self._service, self._config),
            name=self._thread_name,
            daemon=True,
        )
        proc.start()
        child_end.close()  # so that the child's death shows here as end-of-file
        self._proc, self._conn = proc, parent_end
        self._spawned = True
        try:
            reply = self._receive(f"start-up ({self._loading})", self.start_timeout)
        except WorkerError:
            self._stop_process()
            raise
        if reply[0] != "ready":
            self._stop_process()
            self._fatal = self.error_class(f"{self._title} failed to start: {reply[1]}", reply[2])
            raise self._fatal
        self.info = reply[1]
        log.info("%s started (pid %s)", self._title, proc.pid)

    def _ensure_running(self) -> None:
        if self._closed:
            raise self.error_class(f"this {self._owner} is closed")
        if self._fatal is not None:
            raise self._fatal
        if self._proc is not None and self._proc.is_alive():
            return
        if self._proc is not None:
            code = self._proc.exitcode
            pid = self._proc.pid
            self._stop_process()
            log.warning("%s (pid %s) is gone (%s)", self._label, pid, describe_exit(code))
        if self._spawned:
            if not self.auto_restart:
                raise self.crash_class(
                    f"the {self._label} is not running (it died or was stopped) and auto_restart is off"
                )
            if self.restarts >= self.max_restarts:
                raise self.crash_class(f"the {self._label} has been restarted {self.restarts} times; giving up")
            self.restarts += 1
            log.warning("restarting the %s (%d of at most %d)", self._label, self.restarts, self.max_restarts)
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

        def timeout_error() -> WorkerTimeoutError:
            self._stop_process()
            return self.timeout_class(
                f"the {self._label} (pid {pid}) gave no answer to {what} within {timeout:g} s; it was killed.{after}"
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
            # even if the worker stalls in the middle of a long message.
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
                    f" (A script that starts a {self._owner} must keep its top-level code under"
                    ' `if __name__ == "__main__":`: the spawned process imports the main module again.)'
                )
            raise self.crash_class(
                f"the {self._label} (pid {pid}) died during {what} ({describe_exit(code)}).{after}{hint}"
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
        raise self.error_class(f"the {self._title} failed on {op}: {reply[1]}", reply[2])

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        if self._closing or self._closed:
            raise self.error_class(f"this {self._owner} is closed")
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
                    max_workers=1, thread_name_prefix=self._thread_name, initializer=remember_worker
                )
        return self._executor.submit(fn, *args)

    def ping(self, timeout: float | None = None) -> int:
        """Round trip to the worker (starting it if needed); returns its pid."""
        return self._submit(self._request, "ping", None, timeout).result()

    def call(self, op: str, args: Any = None, timeout: float | None = None) -> Any:
        """Run one request on the worker and wait for its result."""
        return self.call_async(op, args, timeout).result()

    def call_async(self, op: str, args: Any = None, timeout: float | None = None) -> concurrent.futures.Future:
        """Future of `call(...)`."""
        return self._submit(self._request, op, args, timeout)
