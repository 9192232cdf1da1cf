"""Where training metrics and sample grids go: JSONL, TensorBoard, PNG, the terminal.

Only process 0 writes (`enabled=False` elsewhere). Every file goes through
`ddpm_jax.runtime.storage` (etils epath), so a workdir may be local or `gs://`.

TensorBoard event files are written by tensorboardX, chosen on import cost:
in a fresh process `from tensorboardX import SummaryWriter` takes 1.1 s and
80 MB (numpy and protobuf alone 0.35 s), against 9-10 s and 670 MB for
`import tensorflow` (`tf.summary`, also what clu's writers use), which the
training process otherwise never imports (measured on the project's 2-core
CPU machine; tensorboardX also imports torch when it is installed, +3.3 s).
Its record writers are pluggable per URL scheme: remote event files go through
epath here, buffered and uploaded whole on each flush, as tensorboardX's own
GCS writer does.
"""
import io
import json
import sys
import time
from typing import Dict, List, Optional

import numpy as np
from etils import epath

from ddpm_jax.runtime import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
SAMPLES_SUBDIR = "samples"
# A remote event file is uploaded whole on each flush: only this often (by tensorboardX's
# thread) and on close, so that a run does not upload a growing file at every log step.
REMOTE_FLUSH_SECS = 60


# --- TensorBoard event files ------------------------------------------------------------------

class _WholeFileWriter:
    """A file object for tensorboardX that keeps the event file in memory and writes it
    whole through epath on flush (Cloud Storage objects cannot be appended to)."""

    def __init__(self, path: str):
        self.path = path
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        storage.write_bytes(self.path, self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathWriterFactory:
    """tensorboardX's hook for a URL scheme: directories and files through epath."""

    def open(self, path: str) -> _WholeFileWriter:
        return _WholeFileWriter(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _summary_writer(directory: str):
    """A tensorboardX SummaryWriter on `directory`, local or remote (imported on first use)."""
    from tensorboardX import SummaryWriter, record_writer
    for prefix in storage.REMOTE_PREFIXES:
        record_writer.register_writer_factory(prefix.split(":")[0], _EpathWriterFactory())
    local = storage.is_local(directory)
    return SummaryWriter(directory, flush_secs=120 if local else REMOTE_FLUSH_SECS)


# --- The writer the training loop uses ----------------------------------------------------------

class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step), TensorBoard scalars and images.

    On resume at step k, `metrics.jsonl` lines of steps after k (written by the
    interrupted run after its last checkpoint) are dropped, so that the file
    holds each step once, as the resumed run computes it. The first `flush` writes
    the file whole; later ones append the new lines to a local file and rewrite a
    remote one (Cloud Storage objects cannot be appended to; see `ddpm_jax.runtime.storage`).
    """

    def __init__(self, workdir: str, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.jsonl_path = epath.Path(workdir) / METRICS_FILE
        self._events = None
        if not enabled:
            return
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        self._lines = _rows_until(self.jsonl_path, resume_step)
        self._written = None  # the number of lines in the file, None: not written yet
        self._remote = not storage.is_local(workdir)
        self._events = _summary_writer(str(epath.Path(workdir) / TENSORBOARD_SUBDIR))

    def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _json_number(v) for k, v in scalars.items()}}
        self._lines.append(json.dumps(row) + "\n")
        for tag, value in scalars.items():
            self._events.add_scalar(tag, float(value), int(step))

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 [H, W, C] image (e.g. a sample grid) to TensorBoard."""
        if self.enabled:
            self._events.add_image(tag, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        """metrics.jsonl now; the event file too if it is local (a remote one is uploaded
        every REMOTE_FLUSH_SECS and on close)."""
        if not self.enabled:
            return
        if self._written != len(self._lines):
            if self._remote or self._written is None:
                storage.write_bytes(self.jsonl_path, "".join(self._lines).encode())
            else:  # a local file grows by its new lines only
                with self.jsonl_path.open("a") as f:
                    f.write("".join(self._lines[self._written:]))
            self._written = len(self._lines)
        if not self._remote:
            self._events.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self._events.close()


def _json_number(value) -> Optional[float]:
    """JSON has no NaN or infinity: write them as null, and ints as ints."""
    value = np.asarray(value).item()
    if isinstance(value, (bool, int)):
        return int(value)
    return value if np.isfinite(value) else None


def _rows_until(path: epath.Path, last_step: int) -> List[str]:
    """The lines of a metrics file up to step `last_step`, without a torn last line."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return kept


def read_metrics(workdir: str):
    """The rows of a workdir's metrics.jsonl, in order."""
    text = (epath.Path(workdir) / METRICS_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- The terminal ------------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ConsoleReporter:
    """A progress bar on an interactive terminal, one line per log step otherwise."""

    def __init__(self, total_steps: int, *, enabled: bool, stream=None):
        self.total_steps = total_steps
        self.enabled = enabled
        self.stream = sys.stdout if stream is None else stream
        self.interactive = enabled and self.stream.isatty()
        self._last_line = ""
        self._last_draw = 0.0

    def step(self, step: int) -> None:
        """Advance the bar to `step`, the last step known computed (not the last dispatched:
        the loop learns it from the calls in flight, without reading the device)."""
        if self.interactive and time.monotonic() - self._last_draw > 0.2:
            self._draw(step, self._last_line)

    def log(self, step: int, loss: float, images_per_s: float, seconds_left: float,
            extra: str = "") -> None:
        if not self.enabled:
            return
        line = (f"loss {loss:.4f} | {images_per_s:,.0f} img/s | "
                f"{format_duration(seconds_left)} left{extra}")
        if self.interactive:
            self._last_line = line
            self._draw(step, line)
        else:
            print(f"step {step}/{self.total_steps} | {line}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line of its own (a warning, the final status), not overwritten by the bar."""
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\n")
        print(text, file=self.stream, flush=True)

    def _draw(self, step: int, line: str) -> None:
        width = 30
        filled = int(width * step / max(self.total_steps, 1))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r[{bar}] {step}/{self.total_steps} {line}\033[K")
        self.stream.flush()
        self._last_draw = time.monotonic()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
