"""Devices and processes: joining a multi-host run, the data mesh, global batches.

Training is data parallel over one mesh axis, 'data', that spans every device
of every process: the state is replicated (`P()`), the batch split along its
first axis (`P('data')`). The mesh lists devices process by process, so
process p's devices hold rows [p * B/P, (p + 1) * B/P) of a global batch of
B, which is exactly the slice the input pipeline reads on process p.
"""
import glob
import importlib.util
import logging
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

log = logging.getLogger(__name__)


def cluster_environment() -> Optional[str]:
    """The multi-process environment that `jax.distributed.initialize()` can configure
    itself from, or None: a Cloud TPU VM, a SLURM job or Open MPI with several tasks."""
    if importlib.util.find_spec("libtpu") is not None and (
            glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "Cloud TPU VM"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
    """Join a multi-process run if one is asked for or detected; return whether it was joined.

    Explicit arguments (all three; the address may also come from
    $JAX_COORDINATOR_ADDRESS) start a run on any machines, e.g. two processes
    on localhost with CPU collectives (gloo). Otherwise a Cloud TPU VM, SLURM
    or Open MPI configures the processes. Must run before anything touches a
    device.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "a multi-process run needs all of coordinator_address (host:port of process 0, "
                "or $JAX_COORDINATOR_ADDRESS), num_processes and process_id; got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must be in [0, num_processes="
                             f"{num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    environment = cluster_environment()
    if environment is None:
        return False
    log.info("Initializing jax.distributed for %s", environment)
    jax.distributed.initialize()
    return True


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The 1-D 'data' mesh over `devices` (default: all), each process's devices contiguous."""
    devices = list(jax.devices() if devices is None else devices)
    processes = [d.process_index for d in devices]
    if processes != sorted(processes):
        raise ValueError(f"devices must be ordered by process so that each process's batch "
                         f"rows are contiguous; got process indices {processes}")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def stacked_batch_sharded(mesh: Mesh) -> NamedSharding:
    """Batches for several steps stacked as [k, B, ...]: each step's batch split over 'data'."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global batch array, split over 'data', from this process's rows of it.

    Every process passes its own [B / P, ...] rows (the input pipeline's
    `local_slice`); no data crosses processes.
    """
    global_shape = (local_batch.shape[0] * jax.process_count(),) + local_batch.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharded(mesh), local_batch, global_shape)


def global_batches(local_batches: np.ndarray, mesh: Mesh) -> jax.Array:
    """`global_batch` for k steps at once: [k, B / P, ...] rows of this process -> the global
    [k, B, ...] array, split over 'data' on axis 1."""
    k, local = local_batches.shape[:2]
    global_shape = (k, local * jax.process_count()) + local_batches.shape[2:]
    return jax.make_array_from_process_local_data(stacked_batch_sharded(mesh), local_batches,
                                                  global_shape)


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op for a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def map_batches(fn: Callable[..., Any], arrays: Sequence[np.ndarray], batch_size: int, *,
                mesh: Optional[Mesh] = None,
                progress: Optional[Callable[[int, int, int], None]] = None) -> Any:
    """`fn(*batches)` over the rows of `arrays` (equal first axes, N rows), as numpy.

    Every batch has the same shape, min(batch_size, N) rows rounded up to the device
    count of `mesh`, so `fn` compiles once; with a mesh the batches are global arrays
    split over its devices (every process passes the same arrays and gets all
    outputs), without one they are numpy. The last batch is padded with copies of its
    first row, whose outputs are dropped. `progress(batches done, batches, rows done)`
    is called after each batch.
    """
    num_rows = len(arrays[0])
    num_devices = 1 if mesh is None else mesh.devices.size
    batch = -(-min(batch_size, num_rows) // num_devices) * num_devices
    num_batches = -(-num_rows // batch)
    outputs = []
    for start in range(0, num_rows, batch):
        chunks = [a[start:start + batch] for a in arrays]
        rows = len(chunks[0])
        padded = [np.concatenate([c, np.repeat(c[:1], batch - rows, axis=0)]) for c in chunks]
        if mesh is not None:
            sharding = batch_sharded(mesh)
            padded = [jax.make_array_from_callback(p.shape, sharding, lambda index, p=p: p[index])
                      for p in padded]
        out = jax.device_get(fn(*padded))
        outputs.append(jax.tree.map(lambda x, rows=rows: np.asarray(x)[:rows], out))
        if progress is not None:
            progress(len(outputs), num_batches, start + rows)
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)


def configure_compilation_cache(config) -> None:
    """Keep compiled programs on disk, so a resumed run skips the compile (e.g. 14 s -> 1.4 s).

    An empty config.training.compilation_cache_dir leaves JAX's own setting
    ($JAX_COMPILATION_CACHE_DIR) alone. The commands made the path absolute
    (`config_validation.resolve_paths`).
    """
    directory = config.training.compilation_cache_dir
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
