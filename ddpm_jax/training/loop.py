"""The host loop around the compiled step (`train_step`): open the data, resume, log,
checkpoint, sample, stop.

The host runs at most `preemption.MAX_CALLS_IN_FLIGHT` calls ahead of the
devices (waiting on a call's loss, which copies nothing), so that a stop request
is honoured within about two steps; metrics stay on the devices as arrays until
the host logs, checkpoints or samples. A non-finite loss
or gradient is caught inside the step, which then leaves the parameters,
EMA and optimizer state as they were and counts the step in
`state.skipped_steps`; `config.training.nan_policy='stop'` also makes the host
stop at its next read of the metrics (at the latest before the next
checkpoint, so no checkpoint holds a state past a non-finite step).
"""
import dataclasses
import logging
import math
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddpm_jax import config_validation, sampling
from ddpm_jax.data import datasets, input_pipeline, streaming
from ddpm_jax.evaluation import suite
from ddpm_jax.models import unet
from ddpm_jax.runtime import images, parallel
from ddpm_jax.runtime.metrics_writer import SAMPLES_SUBDIR, ConsoleReporter, MetricsWriter
from ddpm_jax.schedules import schedule_from_config
from ddpm_jax.training import checkpointing, preemption, train_step
from ddpm_jax.training.train_state import TrainState, create_train_state, make_optimizer

log = logging.getLogger(__name__)

# Makes an iterator of this process's batches (float32 [B / P, H, W, C]; for a
# conditional model (images, int32 labels [B / P]) pairs) from a source,
# starting at batch number `start_step`.
IteratorFactory = Callable[[input_pipeline.Source, int], Iterator[np.ndarray]]


class NonFiniteError(RuntimeError):
    """A step had a non-finite loss or gradient and config.training.nan_policy is 'stop'."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclasses.dataclass(frozen=True)
class TrainResult:
    state: TrainState
    step: int
    status: str  # 'completed', or 'preempted' when stopped early by a signal (checkpoint saved)


def _parts(batch) -> Tuple[np.ndarray, ...]:
    """A batch as the step's inputs: (images,) or, from a labeled iterator, (images, labels)."""
    return batch if isinstance(batch, tuple) else (batch,)


def num_train_steps(config, num_examples: int) -> int:
    """config.training.num_train_steps, else num_epochs of full batches of the train split."""
    if config.training.num_train_steps is not None:
        return config.training.num_train_steps
    per_epoch = input_pipeline.steps_per_epoch(num_examples, config.training.batch_size)
    return max(1, int(round(config.training.num_epochs * per_epoch)))


def _check_call_boundaries(config, total_steps: int, start_step: int) -> None:
    """The run's end (from num_epochs) and its resumed step must fall on call boundaries
    (config_validation checks the explicit step counts)."""
    k = config.training.steps_per_call
    if total_steps % k:
        raise config_validation.ConfigError(
            f"config.training.num_epochs = {config.training.num_epochs} gives {total_steps} "
            f"steps: set config.training.num_train_steps; it "
            + config_validation.steps_per_call_message(total_steps, k))
    if start_step % k:
        raise config_validation.ConfigError(
            f"config.training.steps_per_call = {k}: the checkpoint resumed is at step "
            f"{start_step}, not a multiple of it; resume with a steps_per_call that divides "
            f"{start_step}")


def open_train_source(config) -> input_pipeline.Source:
    """config.data.train_split of the config's dataset (with labels from a folder's class
    subfolders for a conditional model); a dataset, image feature or split that does not
    exist is a ConfigError naming the field."""
    conditional = config.model.num_classes > 0
    try:
        source = input_pipeline.open_config_source(config.data, config.data.train_split,
                                                   "config.data.train_split",
                                                   folder_labels=conditional)
    except datasets.DatasetError as e:
        raise config_validation.ConfigError(str(e)) from None
    if conditional and not input_pipeline.has_labels(source):
        raise config_validation.ConfigError(
            f"config.model.num_classes={config.model.num_classes}: dataset "
            f"{config.data.dataset!r} has no 'label' ClassLabel feature to condition on; "
            f"set 0 for an unconditional model")
    return source


def default_iterator_factory(config) -> IteratorFactory:
    """In-memory sources: `TrainIterator`; a split streamed from disk: `StreamIterator`."""
    def make(source, start_step):
        kwargs = dict(random_flip=config.data.random_flip, start_step=start_step,
                      process_index=jax.process_index(), process_count=jax.process_count(),
                      with_labels=config.model.num_classes > 0)
        if isinstance(source, datasets.TfdsSource):
            return streaming.StreamIterator(source, config.training.batch_size, config.seed,
                                            worker_count=config.data.worker_count, **kwargs)
        return input_pipeline.TrainIterator(source, config.training.batch_size, config.seed,
                                            **kwargs)
    return make


def sample_grid_labels(num_classes: int, num_images: int) -> Optional[np.ndarray]:
    """The labels of a conditional model's sample grid: one row per class, of
    max(1, num_images // num_classes) images each; None for an unconditional model."""
    if not num_classes:
        return None
    return sampling.class_labels("all", num_classes, num_images)[0]


# --- The loop ----------------------------------------------------------------------------------

class _Loop:
    """The host side of a run: metrics kept on device until read, logs, checkpoints, samples."""

    def __init__(self, config, workdir: str, total_steps: int, start_step: int, mesh,
                 checkpointer: checkpointing.Checkpointer, model, schedule, console_stream=None):
        self.config, self.workdir, self.total_steps = config, workdir, total_steps
        self.mesh, self.checkpointer = mesh, checkpointer
        self.model, self.schedule = model, schedule
        primary = jax.process_index() == 0
        self.writer = MetricsWriter(workdir, enabled=primary, resume_step=start_step)
        self.console = ConsoleReporter(total_steps, enabled=primary, stream=console_stream)
        self.pending: List[Tuple[int, Dict[str, jax.Array], int]] = []
        self.in_flight = preemption.InFlight(start_step)
        self.last_checkpoint: Optional[int] = start_step if start_step > 0 else None
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        self.input_wait_s = 0.0

    def next_batch(self, batches: Iterator[np.ndarray]) -> np.ndarray:
        """The next batch, timing how long the loop waits for it: a starved device shows
        as `input_wait_fraction` in the metrics."""
        start = time.perf_counter()
        batch = next(batches)
        self.input_wait_s += time.perf_counter() - start
        return batch

    def wait_for_room(self) -> None:
        """Before dispatching a call: wait until fewer than MAX_CALLS_IN_FLIGHT are computing,
        so that a stop waits for at most that many; the bar shows the steps computed."""
        self.console.step(self.in_flight.wait_for_room())

    def record(self, step: int, metrics: Dict[str, jax.Array], count: int = 1) -> None:
        """Metrics of the call that ended at `step`: `count` steps' values stacked if > 1."""
        self.pending.append((step, metrics, count))
        self.in_flight.add(step, metrics["loss"])
        self.interval_steps += count

    def flush(self) -> None:
        """Read the pending metrics (the only copy from the devices), check finiteness, write
        a row. Its images/s is of computed steps: the read waits for the last of them."""
        if not self.pending:
            return
        steps, values = [], []
        for (last, _, count), fetched in zip(self.pending,
                                             jax.device_get([m for _, m, _ in self.pending])):
            steps += range(last - count + 1, last + 1)  # a call's metrics: stacked if count > 1
            values += [fetched] if count == 1 else [
                {name: v[i] for name, v in fetched.items()} for i in range(count)]
        self.pending = []
        bad = [s for s, v in zip(steps, values) if not v["finite"]]
        if bad and self.config.training.nan_policy == "stop":
            kept = (f"the newest checkpoint, step {self.last_checkpoint}, in "
                    f"{self.checkpointer.directory} predates it" if self.last_checkpoint
                    else "no checkpoint was written")
            raise NonFiniteError(
                f"non-finite loss or gradient at step {bad[0]} (config.training.nan_policy="
                f"'stop'); {kept}. Steps with non-finite values: {bad}", bad[0])
        now = time.perf_counter()
        interval_s = now - self.interval_start
        seconds_per_step = interval_s / self.interval_steps
        input_wait_fraction = min(self.input_wait_s / interval_s, 1.0)
        self.interval_start, self.interval_steps, self.input_wait_s = now, 0, 0.0
        finite = [v for v in values if v["finite"]]
        last = values[-1]
        row = dict(
            loss=float(np.mean([v["loss"] for v in finite])) if finite else float("nan"),
            grad_norm=float(np.mean([v["grad_norm"] for v in finite])) if finite else float("nan"),
            learning_rate=float(last["learning_rate"]),
            skipped_steps=int(last["skipped_steps"]),
            nonfinite_steps=len(bad),
            images_per_s=self.config.training.batch_size / seconds_per_step,
            input_wait_fraction=input_wait_fraction,
        )
        self.writer.write_scalars(steps[-1], row)
        self.writer.flush()
        extra = f" | {len(bad)} non-finite step(s) skipped" if bad else ""
        self.console.log(steps[-1], row["loss"], row["images_per_s"],
                         (self.total_steps - steps[-1]) * seconds_per_step, extra)
        if bad:
            log.warning("Skipped the update of step(s) %s: non-finite loss or gradient "
                        "(%d skipped so far)", bad, row["skipped_steps"])

    def restart_clock(self) -> None:
        """Leave the time spent saving, sampling or evaluating out of the images/s."""
        self.interval_start, self.input_wait_s = time.perf_counter(), 0.0

    def save(self, step: int, state: TrainState) -> None:
        self.flush()  # with nan_policy='stop', never checkpoint past a non-finite step
        if self.last_checkpoint != step:
            self.checkpointer.save(step, state, self.config)
            self.last_checkpoint = step
            self.restart_clock()

    def sample(self, step: int, state: TrainState) -> None:
        """A grid of EMA samples, the same noise every time (all processes compute it)."""
        self.flush()
        c = self.config
        labels = sample_grid_labels(self.model.num_classes, c.training.num_sample_images)
        conditional = {} if labels is None else dict(labels=labels,
                                                     guidance=c.sampling.guidance)
        result = sampling.generate(
            sampling.ModelApply(self.model), state.ema_params, self.schedule,
            (c.data.image_size, c.data.image_size, c.data.channels),
            c.training.num_sample_images if labels is None else len(labels), seed=c.seed,
            mesh=self.mesh, **sampling.settings(c), **conditional)
        if jax.process_index() == 0:
            nrow = (math.ceil(math.sqrt(len(result.images))) if labels is None
                    else len(labels) // self.model.num_classes)
            grid = images.make_grid(result.images, nrow=nrow)
            images.save_png(grid, epath.Path(self.workdir) / SAMPLES_SUBDIR
                            / f"step_{step:07d}.png")
            self.writer.write_image(step, "samples", grid)
            self.writer.flush()
        self.restart_clock()

    def evaluate(self, step: int, state: TrainState, evaluator) -> None:
        """The evaluations due at `step` (test bits/dim, sample quality) of the EMA weights."""
        self.flush()
        self.writer.write_scalars(step, evaluator(state.ema_params, step))
        self.writer.flush()
        self.restart_clock()

    def close(self) -> None:
        self.console.close()
        self.writer.close()


def _stop_requested(stop_event: Optional[threading.Event], step: int, log_every: int) -> bool:
    """Whether to stop before the next step. With several processes all must agree, so they
    compare flags (a collective) only at log steps."""
    if stop_event is None:
        return False
    if jax.process_count() == 1:
        return stop_event.is_set()
    return step % log_every == 0 and parallel.any_process(stop_event.is_set())


def train(config, workdir: str, *, allow_config_change: bool = False,
          stop_event: Optional[threading.Event] = None,
          iterator_factory: Optional[IteratorFactory] = None,
          console_stream=None) -> TrainResult:
    """Train `config` in `workdir`, resuming from its newest readable checkpoint.

    stop_event: once set (e.g. by a SIGTERM handler), the run finishes the
      steps in flight (at most MAX_CALLS_IN_FLIGHT calls), saves a checkpoint,
      waits until it is on disk and returns with status 'preempted'.
    iterator_factory: (source, start_step) -> this process's batches; default:
      the config's input pipeline.
    Raises ConfigError, checkpointing.CheckpointError / ConfigMismatchError,
    or NonFiniteError (nan_policy='stop'), each with a message for the user.
    """
    config_validation.validate_config(config, num_devices=jax.device_count(),
                                      process_count=jax.process_count())
    mesh = parallel.make_mesh()
    replicated = parallel.replicated(mesh)
    model, optimizer = unet.create_model(config), make_optimizer(config)
    schedule = schedule_from_config(config.diffusion)
    d = config.diffusion
    log.info("Schedule %s, T=%d, terminal_snr %s: alpha_bar_T = %.3g; objective %s, loss "
             "weighting %s", d.beta_schedule, d.timesteps, d.terminal_snr,
             float(schedule.alphas_cumprod[-1]), d.objective, d.loss_weighting)

    source = open_train_source(config)  # before touching the workdir: data errors come first
    log.info("%s", input_pipeline.describe(source, config.data, config.data.train_split,
                                           config.model.num_classes))
    total_steps = num_train_steps(config, len(source))
    checkpointer = checkpointing.Checkpointer(workdir, config.training.keep_checkpoints)
    abstract = checkpointing.abstract_train_state(config, replicated)
    restored = checkpointer.restore_latest(lambda _: abstract, config,
                                           allow_config_change=allow_config_change,
                                           move_unreadable=True)
    if restored is None:
        state = jax.jit(lambda key: create_train_state(config, model, optimizer, key),
                        out_shardings=replicated)(jax.random.key(config.seed))
        start_step = 0
    else:
        state, start_step, _ = restored

    k = config.training.steps_per_call
    _check_call_boundaries(config, total_steps, start_step)
    size, channels = config.data.image_size, config.data.channels
    batch_shape = (config.training.batch_size, size, size, channels)
    shapes = [batch_shape] + ([batch_shape[:1]] if model.num_classes else [])
    dtypes = [jnp.float32, jnp.int32]
    batch_abstract = [
        jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharded(mesh)) if k == 1
        else jax.ShapeDtypeStruct((k, *shape), dtype, sharding=parallel.stacked_batch_sharded(mesh))
        for shape, dtype in zip(shapes, dtypes)]
    if k > 1 and jax.default_backend() == "cpu":
        log.warning("config.training.steps_per_call = %d: XLA:CPU runs the scanned step about "
                    "4x slower than single steps (docs/speed.md); use 1 on a CPU", k)
    log.info("Compiling the train step (on a CPU, minutes for the ConvNeXt configs)")
    compile_start = time.perf_counter()
    step_fn = train_step.make_train_step(config, model, schedule, optimizer, mesh, k).lower(
        abstract, *batch_abstract).compile()
    log.info("Compiled the train step in %.1f s; %s from step %d to %d on %d device(s), "
             "%d process(es)", time.perf_counter() - compile_start,
             "resuming" if start_step else "training", start_step, total_steps,
             jax.device_count(), jax.process_count())

    evaluator = None
    if "eval" in config and (config.eval.bpd_every > 0 or config.eval.fid_every > 0):
        evaluator = suite.Evaluator(config, mesh)
    loop = _Loop(config, workdir, total_steps, start_step, mesh, checkpointer, model,
                 schedule, console_stream)
    factory = iterator_factory or default_iterator_factory(config)
    batches = factory(source, start_step)
    t = config.training
    step, status = start_step, "completed"
    try:
        while step < total_steps:
            loop.wait_for_room()  # first: a stop request that came meanwhile is seen at once
            if _stop_requested(stop_event, step, t.log_every):
                status = "preempted"
                break
            if k == 1:
                state, metrics = step_fn(state, *(parallel.global_batch(part, mesh)
                                                  for part in _parts(loop.next_batch(batches))))
            else:  # k batches at once, one dispatch
                calls = [_parts(loop.next_batch(batches)) for _ in range(k)]
                state, metrics = step_fn(state, *(parallel.global_batches(np.stack(part), mesh)
                                                  for part in zip(*calls)))
            step += k
            loop.record(step, metrics, k)
            if step % t.log_every == 0:
                loop.flush()
            if step % t.checkpoint_every == 0:
                loop.save(step, state)
            if t.sample_every and step % t.sample_every == 0:
                loop.sample(step, state)
            if evaluator is not None and evaluator.due(step):
                loop.evaluate(step, state, evaluator)
        loop.save(step, state)
        checkpointer.wait()
        if status == "preempted":
            loop.console.message(f"Stopped at step {step}: checkpoint saved in "
                                 f"{checkpointer.directory}; run the same command to resume.")
        else:
            loop.console.message(f"Finished training at step {step}; checkpoints in "
                                 f"{checkpointer.directory}.")
    finally:
        if hasattr(batches, "close"):
            batches.close()
        checkpointer.close()  # waits for any save in flight: a good state is never lost
        loop.close()
    return TrainResult(state=state, step=step, status=status)

