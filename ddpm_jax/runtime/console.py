"""What the commands print: their own messages and every warning; library chatter on request.

Orbax logs ~40 INFO lines per checkpoint restore and TFDS a few per dataset it
opens, through absl's handler, burying what a user needs (what is loaded,
progress, where results went, the numbers). `quiet_libraries()`, called first
in each command's `main`, keeps INFO records of this package (the commands
themselves print) and drops other libraries' INFO and DEBUG records, unless
`--verbosity=1` (absl's flag) or higher asks for them. With the same switch it
prints this package's lines without absl's prefix (`I1204 15:10:36.297837
140622158187392 datasets.py:133] `), drops TFDS's warning about the empty
version folder it creates itself while preparing a dataset, and keeps the C++
INFO lines of TensorFlow and XLA (TensorFlow's oneDNN and CPU-feature banners)
off the console. TFDS's progress bars and messages follow it too
(`datasets.prepare_tfds`).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from absl import logging as absl_logging

def verbose() -> bool:
    """Whether the user asked for library chatter (absl's --verbosity >= 1)."""
    return absl_logging.get_verbosity() >= 1


# TensorFlow's and XLA's C++ logging (tsl): 1 drops their INFO lines, keeps warnings and errors.
# Read at their first log line, so setting it before TensorFlow is imported is early enough.
NATIVE_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
# TFDS warns this for the version folder it has just created itself, at every first preparation.
_TFDS_EMPTY_VARIANT = "Variant folder %s has no %s"


def _own(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] == "ddpm_jax"


class _OwnInfoOnly(logging.Filter):
    """Warnings and errors of everyone (but TFDS's empty-folder one); INFO only of this
    package's loggers (`ddpm_jax.*`).

    Orbax's ERROR records are dropped too, with those of the asyncio event loops it
    runs: it logs each failure of a background save, with its traceback, from every
    thread and future it passes through (hundreds of lines), and then raises it to
    the caller, which reports it in one line (`checkpointing.SaveError`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _TFDS_EMPTY_VARIANT:
            return False
        if record.levelno >= logging.ERROR and (record.name == "asyncio"
                                                or "/orbax/" in record.pathname):
            return False
        return record.levelno >= logging.WARNING or _own(record)


class _OwnPlain(absl_logging.PythonFormatter):
    """This package's lines as their bare message ('Warning: ' and 'Error: ' marked); other
    libraries' lines (their warnings) keep absl's prefix, which names their source file."""

    def format(self, record: logging.LogRecord) -> str:
        if not _own(record):
            return super().format(record)
        message = logging.Formatter.format(self, record)
        if record.levelno >= logging.ERROR:
            return f"Error: {message}"
        return f"Warning: {message}" if record.levelno >= logging.WARNING else message


def quiet_libraries() -> None:
    """Unless --verbosity >= 1: drop other libraries' INFO lines and the echoes of a failed
    background save, print this package's lines without absl's prefix, and keep
    TensorFlow's and XLA's C++ INFO lines off the console.

    Call at the start of a command's `main` (after absl parsed the flags, before anything
    imports TensorFlow). A $TF_CPP_MIN_LOG_LEVEL the user set is kept.
    """
    if verbose():
        return
    os.environ.setdefault(NATIVE_LOG_LEVEL_ENV, "1")
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        handler.addFilter(_OwnInfoOnly())
    handler.setFormatter(_OwnPlain())
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _drop_closed_loop_callbacks


def _drop_closed_loop_callbacks(unraisable) -> None:
    """After a background save failed, TensorStore's remaining writes complete into the
    event loop Orbax has already closed, each printing a 'RuntimeError: Event loop is
    closed' traceback (dozens to hundreds); the failure itself is reported as a SaveError."""
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def progress_printer(label: str, enabled: bool = True) -> Callable:
    """A `progress` callback for `sampling.generate` and `bpd.bits_per_dim`: one line
    per chunk with the images done, their rate and the time left (`label`: what a chunk is).

    One line per chunk rather than a tqdm bar: chunks take seconds to minutes each, are
    few, and the lines read the same in a log file as on a terminal.
    """
    def report(p) -> None:
        if enabled:
            left = (p.num_images - p.images_done) / p.images_per_s if p.images_done else 0.0
            print(f"{label} {p.chunks_done}/{p.num_chunks}: {p.images_done}/{p.num_images} "
                  f"images, {p.images_per_s:.2f} images/s, {left:.0f} s left",
                  file=sys.stdout, flush=True)
    return report
