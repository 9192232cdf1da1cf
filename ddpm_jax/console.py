"""What the commands print: their own messages and every warning; library chatter on request.

Orbax logs ~40 INFO lines per checkpoint restore and TFDS a few per dataset it
opens, through absl's handler, burying what a user needs (what is loaded,
progress, where results went, the numbers). `quiet_libraries()`, called first
in each command's `main`, keeps INFO records of this package (the commands
themselves print) and drops other libraries' INFO and DEBUG records, unless
`--verbosity=1` (absl's flag) or higher asks for them. TFDS's progress bars
follow the same switch (`datasets.prepare_tfds`).
"""
from __future__ import annotations

import logging

from absl import logging as absl_logging

def verbose() -> bool:
    """Whether the user asked for library chatter (absl's --verbosity >= 1)."""
    return absl_logging.get_verbosity() >= 1


class _OwnInfoOnly(logging.Filter):
    """Warnings and errors of everyone; INFO only of this package's loggers (`ddpm_jax.*`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] == "ddpm_jax"


def quiet_libraries() -> None:
    """Drop other libraries' INFO lines from the console unless --verbosity >= 1.

    Call at the start of a command's `main` (after absl parsed the flags).
    """
    if verbose():
        return
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        handler.addFilter(_OwnInfoOnly())
