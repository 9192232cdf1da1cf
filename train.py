"""Train a DDPM: `python train.py --config=configs/fashion.py --workdir=DIR`.

Every config field can be overridden, e.g. `--config.training.batch_size=64`.
The same command resumes from the newest checkpoint in DIR. SIGTERM or Ctrl-C
finishes the current step, saves a checkpoint and exits (status 128 + the
signal number); a second Ctrl-C aborts at once. DIR, like every path in the
config, may be relative, `~/...`, absolute or gs://; it is printed as resolved.

Exit status: 0 trained to the end; 1 a bad config, missing data, unreadable
checkpoints or a non-finite step (nan_policy='stop'), with a one-line error;
74 (EX_IOERR) a checkpoint could not be saved: one line names the step, the
directory and the cause (its traceback with --verbosity=1), and the earlier
checkpoints are intact; 128 + N stopped by signal N after saving.

Several processes (e.g. the hosts of a Cloud TPU pod slice) run the same
command each; on Cloud TPU VMs, SLURM and Open MPI they find each other by
themselves, elsewhere pass --coordinator_address, --num_processes and
--process_id.
"""

from ddpm_jax.runtime import cpu_defaults

cpu_defaults.apply_cpu_defaults(restart=__name__ == "__main__")  # before JAX starts

import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import jax  # noqa: E402

from ddpm_jax import config_validation  # noqa: E402
from ddpm_jax.runtime import console, parallel, storage  # noqa: E402
from ddpm_jax.training import checkpointing, loop, preemption  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume from a workdir whose checkpoints were trained with a different model or diffusion "
    "config (the state's shapes must still match).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 of a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
    """absl's flag parsing, with a misspelled --config.<field> reported in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError) as e:  # config_flags: a field the config does not have
        message = e
        while isinstance(message, BaseException) and message.args:
            message = message.args[0]
        message = str(message).replace("\n", " ")
        sys.exit(f"error: unknown config field in a --config.<section>.<field> flag: {message}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.quiet_libraries()
    # Before anything touches a device (importing the package does not).
    parallel.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                          _PROCESS_ID.value)
    config = _CONFIG.value
    storage.absolute_flags("workdir")
    resolved = config_validation.resolve_paths(config)
    if jax.process_index() == 0:
        for name, path in {"workdir": _WORKDIR.value,
                           **{f"config.{k}": v for k, v in resolved.items()}}.items():
            print(f"{name}: {path}", flush=True)
    parallel.configure_compilation_cache(config)
    try:
        with preemption.stop_on_signals() as stop:
            result = loop.train(config, _WORKDIR.value, stop_event=stop,
                                allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except config_validation.ConfigError as e:
        sys.exit(f"error: {e}\n(set a field with --config.<section>.<field>=VALUE)")
    except checkpointing.SaveError as e:
        if console.verbose():
            traceback.print_exception(e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(os.EX_IOERR)
    except (checkpointing.CheckpointError, loop.NonFiniteError,
            FileNotFoundError) as e:  # includes datasets.MissingDataError
        sys.exit(f"error: {e}")
    if result.status == "preempted":
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
