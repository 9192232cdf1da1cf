"""Signals that ask a training run to stop: a SIGTERM (a Cloud TPU preemption) or Ctrl-C.

Kept apart from the loop in `training`, which only sees a `threading.Event`:
the handler belongs to the command (train.py), not to the library.
"""
import contextlib
import logging
import signal
import threading
from typing import Iterator

log = logging.getLogger(__name__)


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
