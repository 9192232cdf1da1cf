"""Where training metrics and sample grids go: JSONL, TensorBoard, PNG, the terminal.

Only process 0 writes (`enabled=False` elsewhere). TensorBoard event files are
written directly (TFRecord framing of `Event` protocol buffers, encoded here),
so logging needs neither TensorFlow (seconds to import, ~700 MB) nor the
`tensorboard` package; TensorBoard reads them as usual.
"""
import io
import json
import os
import socket
import struct
import sys
import time
from typing import Dict, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
SAMPLES_SUBDIR = "samples"


# --- TensorBoard event files ------------------------------------------------------------------

def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _event(step: int, *, summary_values=(), file_version: Optional[str] = None) -> bytes:
    """An `Event` proto: wall_time=1 (double), step=2, file_version=3, summary=5."""
    event = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint_field(2, step)
    if file_version is not None:
        event += _bytes_field(3, file_version.encode())
    if summary_values:
        event += _bytes_field(5, b"".join(_bytes_field(1, v) for v in summary_values))
    return event


def _scalar_value(tag: str, value: float) -> bytes:
    """`Summary.Value` with tag=1 and simple_value=2 (float)."""
    return _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)


def _image_value(tag: str, png: bytes, height: int, width: int, channels: int) -> bytes:
    """`Summary.Value` with tag=1 and image=4 (height=1, width=2, colorspace=3, png=4)."""
    image = (_varint_field(1, height) + _varint_field(2, width) + _varint_field(3, channels)
             + _bytes_field(4, png))
    return _bytes_field(1, tag.encode()) + _bytes_field(4, image)


class EventFileWriter:
    """Appends TensorBoard events to a new `events.out.tfevents.*` file in `directory`."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(directory, name)
        self._file = open(self.path, "ab")
        self._write(_event(0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header))
                         + record + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, scalars: Dict[str, float]) -> None:
        self._write(_event(step, summary_values=[_scalar_value(k, float(v))
                                                 for k, v in scalars.items()]))

    def image(self, step: int, tag: str, png: bytes, shape) -> None:
        height, width, channels = shape
        self._write(_event(step, summary_values=[_image_value(tag, png, height, width,
                                                              channels)]))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# --- The writer the training loop uses ----------------------------------------------------------

def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] (C = 1 or 3) as PNG."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step), TensorBoard scalars and images.

    On resume at step k, `metrics.jsonl` lines of steps after k (written by the
    interrupted run after its last checkpoint) are dropped, so that the file
    holds each step once, as the resumed run computes it.
    """

    def __init__(self, workdir: str, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, METRICS_FILE)
        self._events = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _truncate_jsonl(self.jsonl_path, resume_step)
        self._jsonl = open(self.jsonl_path, "a")
        self._events = EventFileWriter(os.path.join(workdir, TENSORBOARD_SUBDIR))

    def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _json_number(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._events.scalars(step, scalars)

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 [H, W, C] image (e.g. a sample grid) to TensorBoard."""
        if self.enabled:
            self._events.image(step, tag, png_bytes(image), image.shape)

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._events.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._events.close()


def _json_number(value) -> Optional[float]:
    """JSON has no NaN or infinity: write them as null, and ints as ints."""
    value = np.asarray(value).item()
    if isinstance(value, (bool, int)):
        return int(value)
    return value if np.isfinite(value) else None


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drop the rows of steps after `last_step`, and a torn last line."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_metrics(workdir: str):
    """The rows of a workdir's metrics.jsonl, in order."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


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
        """Advance the bar (no device sync: the step count is known on the host)."""
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
