"""Stopping a training run in time: the signals that ask it (a SIGTERM, i.e. a Cloud TPU
preemption, or Ctrl-C) and the bound on how far the host runs ahead of the devices.

Kept apart from the loop in `training`, which only sees a `threading.Event`:
the handler belongs to the command (train.py), not to the library.
"""
import collections
import contextlib
import logging
import signal
import threading
from typing import Any, Deque, Iterator, Tuple

log = logging.getLogger(__name__)

# Compiled calls dispatched and not yet computed. JAX queues every call the host dispatches,
# and the loop reads the devices only when it logs, so without a bound the host ran up to
# `log_every` steps ahead (as many as the runtime queues, 33 on XLA:CPU): a stop then waited
# for all of them (33 Fashion-MNIST steps, 155 s on a CPU, against a preemption notice of
# ~30 s; docs/training.md). Two keep a device busy (it runs one call while
# the next waits in its queue, so the host has a whole call's time to prepare the one after)
# and bound the stop at two calls plus the save. A constant, not a config field: it changes no
# number a run computes, and a deeper queue only helps a host slower than its device, which
# no depth fixes (config.training.steps_per_call is the lever there).
MAX_CALLS_IN_FLIGHT = 2


class StopRequest(threading.Event):
    """Set by the first SIGTERM/SIGINT; `signum` says which (0 before)."""
    signum: int = 0


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator[StopRequest]:
    """An event that the first SIGTERM/SIGINT sets, asking `train` to checkpoint and return.

    A second SIGINT (Ctrl-C again) aborts at once with KeyboardInterrupt; the
    previous handlers are restored on exit.
    """
    event = StopRequest()

    def handle(signum, frame):
        del frame
        if event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        event.signum = signum
        event.set()
        log.warning("Received %s: finishing the current step, then saving a checkpoint "
                    "(Ctrl-C again to abort without saving)", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield event
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class InFlight:
    """The compiled calls dispatched and not yet known to be computed, at most `limit`.

    Each call is represented by one small output of it (e.g. its loss; a jax.Array), ready
    when the call is: waiting on it copies nothing from the device.
    """

    def __init__(self, computed_step: int, limit: int = MAX_CALLS_IN_FLIGHT):
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.computed_step = computed_step  # the last step known to be computed
        self._calls: Deque[Tuple[int, Any]] = collections.deque()  # (last step, output)

    def add(self, step: int, output) -> None:
        """A call ending at `step` was dispatched; `output` is one of its outputs."""
        self._calls.append((step, output))

    def wait_for_room(self) -> int:
        """Block until fewer than `limit` calls are in flight; the last step known computed
        (calls already finished are counted without blocking)."""
        while self._calls and (len(self._calls) >= self.limit or self._calls[0][1].is_ready()):
            step, output = self._calls.popleft()
            output.block_until_ready()
            self.computed_step = step
        return self.computed_step
