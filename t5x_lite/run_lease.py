"""An exclusive lease on a run folder: one training run writes into a MODEL_DIR at a time.

The lease is the file `MODEL_DIR/.lease.json` (host, pid, start and refresh times, a token), created with an
exclusive create (`storage.create_exclusive`: O_EXCL locally, a conditional write on GCS), refreshed by a daemon
thread while the run lives and removed when it ends (normally, with an error, or on SIGTERM). A second run into
a held folder is refused at once; a stale lease (on this host its process is gone; or not refreshed for
`stale_after_s`) is taken over with one log line. In a multi-process run process 0 holds it for the job and the others follow its outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gin
import jax
import numpy as np
from absl import logging
from etils import epath

from t5x_lite import cli, storage

LEASE_FILE = ".lease.json"
_READ_TRIES = 20  # a lease being created is empty for an instant: re-read it for up to ~1 s

Run = TypeVar("Run", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its file says."""

    host: str
    pid: int
    started: float  # seconds since the epoch
    refreshed: float
    token: str

    def describe(self, model_dir: str, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"MODEL_DIR {model_dir} is in use by pid {self.pid} on host {self.host} since {since} "
                f"(lease refreshed {max(now - self.refreshed, 0):.0f} s ago)")


def stale_reason(holder: Holder, now: float, stale_after_s: float) -> str | None:
    """Why `holder`'s lease no longer counts (its process is gone, or it stopped refreshing); None while it does."""
    if holder.host == socket.gethostname() and not process_alive(holder.pid):
        return f"its process {holder.pid} is gone"
    if now - holder.refreshed > stale_after_s:
        return f"not refreshed for {now - holder.refreshed:.0f} s"
    return None


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """This process's lease on one run folder: `acquire`, then `release` (the refresh thread runs between)."""

    def __init__(self, model_dir: str, stale_after_s: float, refresh_s: float):
        self.model_dir, self.stale_after_s, self.refresh_s = model_dir, stale_after_s, refresh_s
        self.path = storage.path(model_dir) / LEASE_FILE
        now = time.time()
        self.holder = Holder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Creates the lease file, taking over a stale one; a live holder is a `UserError` naming it."""
        if not self._create():
            current = self.read()
            now = time.time()
            reason = "its lease file is unreadable" if current is None else stale_reason(current, now, self.stale_after_s)
            if current is not None and reason is None:
                raise cli.UserError(f"{current.describe(self.model_dir, now)}; wait for it, or pick another MODEL_DIR")
            self._remove_stale(current)
            if not self._create():  # another run took it over at the same moment
                raise cli.UserError(f"MODEL_DIR {self.model_dir} was just taken by another run; pick another MODEL_DIR")
            holder = "an unknown run" if current is None else f"pid {current.pid} on host {current.host}"
            logging.warning("Took over the lease on MODEL_DIR %s from %s (%s).", self.model_dir, holder, reason)
        self._thread = threading.Thread(target=self._refresh_until_released, name="run_lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops refreshing and removes the lease file if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._is_mine():
            self.path.unlink(missing_ok=True)

    def read(self) -> Holder | None:
        """The holder the lease file names; None if there is none or it stays unreadable (a torn write)."""
        for _ in range(_READ_TRIES):
            try:
                return Holder(**json.loads(self.path.read_text()))
            except FileNotFoundError:
                return None
            except (ValueError, TypeError):  # being written right now, or damaged
                time.sleep(0.05)
        return None

    def _create(self) -> bool:
        """Writes the lease file if none exists; False if one does."""
        return storage.create_exclusive(self.path, json.dumps(dataclasses.asdict(self.holder)))

    def _remove_stale(self, stale: Holder | None) -> None:
        """Removes the lease file judged stale, unless another run replaced it meanwhile."""
        current = self.read()
        if current == stale or current is None:
            self.path.unlink(missing_ok=True)

    def _is_mine(self) -> bool:
        current = self.read()
        return current is not None and current.token == self.holder.token

    def _refresh_until_released(self) -> None:
        """Rewrites the refresh time every `refresh_s` (write aside, then an atomic replace) while the lease is ours."""
        while not self._stop.wait(self.refresh_s):
            if not self._is_mine():
                logging.error("The lease on MODEL_DIR %s was taken by another run; this run no longer holds it.",
                              self.model_dir)
                return
            self.holder = dataclasses.replace(self.holder, refreshed=time.time())
            fresh = self.path.parent / f"{LEASE_FILE}.{self.holder.token}"
            fresh.write_text(json.dumps(dataclasses.asdict(self.holder)))
            fresh.replace(self.path)


@gin.configurable
def run_lease(model_dir: str, stale_after_s: float = 300.0, refresh_s: float | None = None) -> Lease:
    """The lease a training run takes on MODEL_DIR: refreshed every `refresh_s` (default: a tenth of
    `stale_after_s`); a lease not refreshed for `stale_after_s` is free for the taking."""
    refresh_s = stale_after_s / 10 if refresh_s is None else refresh_s
    if not 0 < refresh_s < stale_after_s:
        raise cli.UserError(
            f"run_lease needs 0 < refresh_s < stale_after_s, got refresh_s={refresh_s}, stale_after_s={stale_after_s}; "
            "e.g. --gin.run_lease.stale_after_s=300"
        )
    return Lease(model_dir, stale_after_s, refresh_s)


@contextlib.contextmanager
def held(model_dir: str, tidy: Callable[[], None]) -> Iterator[None]:
    """Holds the lease on MODEL_DIR for the block (process 0; the other processes follow its outcome).

    SIGTERM outside the training loop (which handles it itself) releases the lease and calls `tidy` before the
    process ends as SIGTERM ends it by default.
    """
    lease = run_lease(model_dir) if jax.process_index() == 0 else None
    refusal = None
    if lease is not None:
        try:
            lease.acquire()
        except cli.UserError as e:
            refusal = e
    if not all_processes_agree(refusal is None):
        raise refusal or cli.UserError(f"MODEL_DIR {model_dir} is in use (process 0 could not take its lease)")
    if lease is None:
        yield
        return
    try:
        with on_sigterm(lambda: (lease.release(), tidy())):
            yield
    finally:
        lease.release()


def all_processes_agree(ok: bool) -> bool:
    """Process 0's `ok`, on every process (no collective at all in a one-process run)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def on_sigterm(cleanup: Callable[[], object]) -> Iterator[None]:
    """Within the block, SIGTERM runs `cleanup`, then ends the process as it would have (main thread only).

    The handler raises nothing: an exception from a signal handler lands wherever Python happens to be (a garbage
    collector callback swallows it, TensorFlow's threads may crash at exit), so the process is ended instead.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        cleanup()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_empty_folders(folder: epath.Path) -> None:
    """Removes `folder` and the folders under it if they hold no file at all; anything holding a file stays."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.is_dir():
            remove_empty_folders(child)
    if not any(folder.iterdir()):
        folder.rmdir()


def holds_model_dir(run: Run) -> Run:
    """Decorates a run taking `model_dir=`: it holds the folder's lease while it runs, and a folder it created
    is removed again if it fails leaving the folder empty (a failed start leaves no empty run folder)."""

    @functools.wraps(run)
    def leased(*args: Any, **kwargs: Any) -> Any:
        model_dir = kwargs["model_dir"]
        folder = storage.path(model_dir)
        existed = folder.exists()

        def tidy() -> None:
            if not existed and jax.process_index() == 0:
                remove_empty_folders(folder)

        try:
            cli.prepare_output_dir(model_dir, setting="MODEL_DIR")
            with held(model_dir, tidy):
                return run(*args, **kwargs)
        except BaseException:
            tidy()
            raise

    return leased  # type: ignore[return-value]
