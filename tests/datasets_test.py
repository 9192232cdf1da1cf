"""A TFDS dataset prepared in TFDS's default tfrecord format (no random access) is converted
once to ArrayRecord and then reads bitwise as the same dataset prepared in ArrayRecord.

On the dataset built here (tests/support/tiny_tfds.py), opened by name from its data
directory, in memory and streamed by Grain.
"""
import contextlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from ddpm_jax.data import datasets, input_pipeline as ip, streaming
from tests.support import tiny_tfds
from tests.support.train_helpers import subprocess_env

SIZE, GB = 16, 64
VERSION_DIR = f"{tiny_tfds.NAME}/1.0.0"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(tfrecord data dir, ArrayRecord data dir) of the same dataset, prepared once; each
    test converts its own copy of the first."""
    tfrecord, array_record = (tmp_path_factory.mktemp(name) for name in ("tfrecord", "ar"))
    tiny_tfds.prepare(tfrecord, file_format="tfrecord")
    tiny_tfds.prepare(array_record)
    return tfrecord, array_record


@pytest.fixture
def tfrecord_dir(prepared, tmp_path):
    shutil.copytree(prepared[0], tmp_path / "tfds")
    return tmp_path / "tfds"


def open_split(data_dir, streamed, **kwargs):
    return ip.open_source(tiny_tfds.NAME, image_size=SIZE, channels=3, data_dir=data_dir,
                          in_memory_max_bytes=0 if streamed else 1 << 30, **kwargs)


def conversions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Converting")]


def assert_same_batches(got: ip.Source, want: ip.Source):
    for make in (ip.TrainIterator, streaming.StreamIterator):
        with make(got, GB, 3, random_flip=True, start_step=29) as a, \
                make(want, GB, 3, random_flip=True, start_step=29) as b:
            for _ in range(2):
                np.testing.assert_array_equal(next(a), next(b))
    indices = np.arange(0, 2000, 7)
    for x, y in zip(got.read_labeled(indices), want.read_labeled(indices)):
        np.testing.assert_array_equal(x, y)


def test_converted_next_to_its_files_once_and_bitwise_the_array_record_dataset(
        prepared, tfrecord_dir, caplog):
    caplog.set_level("INFO", logger="ddpm_jax")
    version_dir = tfrecord_dir / VERSION_DIR
    streamed = open_split(tfrecord_dir, streamed=True)
    assert conversions(caplog) == [
        f"Converting TFDS dataset {tiny_tfds.NAME!r} (2200 examples, tfrecord format) once to "
        f"ArrayRecord, into {version_dir}"]
    assert isinstance(streamed, datasets.TfdsSource) and len(streamed) == 2000
    assert sorted(p.name for p in version_dir.glob("*.array_record-*")) == [
        f"{tiny_tfds.NAME}-{split}.array_record-00000-of-00001" for split in ("test", "train")]
    caplog.clear()
    in_memory = open_split(tfrecord_dir, streamed=False)  # found converted: no second time
    assert conversions(caplog) == [] and isinstance(in_memory, ip.ArraySource)
    reference = open_split(prepared[1], streamed=True)
    assert_same_batches(streamed, reference)
    assert_same_batches(in_memory, reference)


def test_converted_into_converted_data_dir_leaving_the_source_as_it_was(
        prepared, tfrecord_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="ddpm_jax")
    before = sorted(p.name for p in (tfrecord_dir / VERSION_DIR).iterdir())
    target = tmp_path / "converted"
    for _ in range(2):
        source = open_split(tfrecord_dir, streamed=True, converted_data_dir=target)
        assert source.dataset_dir == str(target / VERSION_DIR)
    assert len(conversions(caplog)) == 1
    assert sorted(p.name for p in (tfrecord_dir / VERSION_DIR).iterdir()) == before
    assert_same_batches(source, open_split(prepared[1], streamed=True))


@contextlib.contextmanager
def read_only(directory):
    """`directory` that this process cannot write to: without write permission, and, for
    root (whom permissions do not stop), immutable (chattr +i); skips if neither holds."""
    directory.chmod(0o555)
    immutable = False
    try:
        probe = directory / "probe"
        with contextlib.suppress(OSError):
            probe.touch()
        if probe.exists():
            probe.unlink()
            immutable = subprocess.run(["chattr", "+i", str(directory)],
                                       capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("cannot make a directory read-only for this user")
        yield directory
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


@pytest.mark.subprocess
def test_a_read_only_source_names_the_field_to_set_and_the_tfds_command(tfrecord_dir,
                                                                       tmp_path):
    version_dir = tfrecord_dir / VERSION_DIR
    with read_only(version_dir):
        with pytest.raises(datasets.DatasetError) as error:
            open_split(tfrecord_dir, streamed=True)
        message = str(error.value)
        assert f"prepared in {version_dir} in the tfrecord format" in message
        assert "Set config.data.converted_data_dir to a directory you can write" in message
        assert (f"tfds convert_format --dataset_version_dir={version_dir} "
                f"--out_file_format=array_record") in message
        # What it says to set works, the source still read-only.
        source = open_split(tfrecord_dir, streamed=True, converted_data_dir=tmp_path / "c")
        assert len(source) == 2000 and source.read([0]).shape == (1, SIZE, SIZE, 3)


# One process of a two-process run: joins it, waits argv[5] s, opens the split, prints what
# it read.
_PROCESS = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from ddpm_jax.data import input_pipeline
from ddpm_jax.runtime import parallel
parallel.maybe_initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
time.sleep(float(sys.argv[5]))
source = input_pipeline.open_source(sys.argv[3], image_size=16, channels=3, data_dir=sys.argv[4],
                                    in_memory_max_bytes=0)
print("read", len(source), int(source.read([3]).sum()), flush=True)
"""


@pytest.mark.subprocess
def test_in_a_two_process_run_process_0_converts_and_the_other_waits(tfrecord_dir):
    """Process 0 comes 3 s late: without the barrier, process 1 would take the machine's lock
    first and convert."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    processes = [subprocess.Popen(
        [sys.executable, "-c", _PROCESS, address, str(i), tiny_tfds.NAME, str(tfrecord_dir),
         "3" if i == 0 else "0"],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-3000:]
    assert [o.count("Converting TFDS dataset") for o in outputs] == [1, 0]
    reads = [line for o in outputs for line in o.splitlines() if line.startswith("read ")]
    assert len(reads) == 2 and reads[0] == reads[1] and reads[0].startswith("read 2000 ")
