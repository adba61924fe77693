"""SIGTERM/SIGINT as a request to stop cleanly: finish the step, checkpoint, exit 0."""

from __future__ import annotations

import signal
import threading
import types

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopRequest:
    """Records a termination signal; the training loop polls `should_stop()` after each step.

    In a multi-process run every process must stop at the same step, so the flag is agreed
    on with an all-gather (any process signalled means all stop).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:  # noqa: PYI034  (typing.Self needs Python 3.11)
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.received is not None
        flags = multihost_utils.process_allgather(np.array(self.received is not None))
        return bool(np.any(flags))
