"""Training batches of a dataset too large for memory, read from disk by Grain.

The batches are those of `input_pipeline.TrainIterator`, computed by the same
function: a Grain MapDataset over step numbers from `start_step` on, each
element `input_pipeline.train_images` of that step (this process's part of
the global batch: indices from (seed, step), read by random access from the
split's ArrayRecord files, decoded, resized, flipped). Grain's worker
processes compute the steps in parallel and in order, each a whole batch, and
keep some ready. So the batch at a step is still a pure function of
(seed, step), each process reads only its own part, and the iterator's whole
state is the next step number, which the checkpoint already holds: Grain's
own iterator state (the position in the range) is never saved, as it is
just `next_step - start_step`.
"""
import functools
import signal
import sys

from ddpm_jax.data import input_pipeline


def _allow_unparsed_absl_flags() -> None:
    """Grain's worker processes read absl flags; outside an absl app (tests, notebooks)
    they are unparsed and would raise, so take the defaults."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
    """Run in each worker: Ctrl-C reaches the whole process group, and a worker that died of
    it would fail the batch the loop waits for before the loop saves its checkpoint; the
    training process stops the workers itself (`close`)."""
    del worker_index, worker_count
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class StreamIterator:
    """Endless training batches from `start_step` on, read by `worker_count` Grain processes
    (0: one background thread of this process), `prefetch` batches ahead per worker.

    Same interface and batches as `input_pipeline.TrainIterator`: `next_step` is
    the step of the batch the next `next()` returns; `close()` (or `with`) stops
    the workers. With `with_labels`, each batch is (images, int32 labels) (the
    source's `read_labeled`).
    """

    def __init__(self, source: input_pipeline.Source, global_batch_size: int, seed: int, *,
                 random_flip: bool, start_step: int = 0, process_index: int = 0,
                 process_count: int = 1, worker_count: int = 0, prefetch: int = 2,
                 with_labels: bool = False):
        import grain  # here, not at the top: `training` imports this module, and a run on
        # in-memory data (the GPU image, which lacks Grain) never streams
        if worker_count < 0:
            raise ValueError(f"worker_count={worker_count} must be non-negative")
        if prefetch < 1:
            raise ValueError(f"prefetch={prefetch} must be at least 1")
        # Validates every argument here rather than in a worker.
        input_pipeline.global_batch_indices(len(source), global_batch_size, seed, start_step)
        input_pipeline.local_slice(global_batch_size, process_index, process_count)
        read = functools.partial(input_pipeline.train_images, source, global_batch_size, seed,
                                 random_flip=random_flip, process_index=process_index,
                                 process_count=process_count, with_labels=with_labels)
        steps = grain.MapDataset.range(start_step, sys.maxsize).map(read)
        if worker_count:
            _allow_unparsed_absl_flags()
            dataset = steps.to_iter_dataset(grain.ReadOptions(num_threads=1)).mp_prefetch(
                grain.MultiprocessingOptions(num_workers=worker_count,
                                             per_worker_buffer_size=prefetch),
                worker_init_fn=_ignore_stop_signals)
        else:
            dataset = steps.to_iter_dataset(
                grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
        self._iterator = iter(dataset)
        self._with_labels = with_labels
        self.next_step = start_step

    def __iter__(self) -> "StreamIterator":
        return self

    def __next__(self):
        batch = next(self._iterator)  # uint8 through the workers' shared memory: 4x less
        self.next_step += 1
        if self._with_labels:
            return input_pipeline.to_float(batch[0]), batch[1]
        return input_pipeline.to_float(batch)

    def close(self) -> None:
        self._iterator.close()

    def __enter__(self) -> "StreamIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
