"""Train batches read, decoded and resized ahead of the step by worker processes (Grain).

The example order is the project's own (``order.batch_ids``, pure): a :class:`Plan` says
which ids every global step reads, and the pipeline only materialises those batches, in
step order. Grain runs it::

    MapDataset.source(steps).map(Materialise(plan))   # step -> its batch, decoded
      .to_iter_dataset(ReadOptions(num_threads=0))    # one batch at a time per worker
      .mp_prefetch(MultiprocessingOptions(workers, per_worker_buffer_size=prefetch))

Worker ``w`` of ``W`` decodes the batches of steps ``w, w + W, ...`` (of the steps asked
for) and Grain interleaves them back in step order; each batch is a pure function of its
step (ids from the plan, pixels from :class:`~jaxrepro.data.sources.Reader`), so the
batches do not depend on the worker count, the prefetch depth or where a pipeline starts
(a resume starts one at the resume step). Memory is bounded: per worker, at most
``prefetch`` finished batches wait in its queue (in shared memory, /dev/shm), ``prefetch``
more in the training process's read-ahead thread, plus the one it decodes: about
``workers * (2 * prefetch + 1)`` batches in all. Augmentation stays in the compiled step.

The training process also computes each step's ids and checks that the batch it gets
holds exactly them (:meth:`Prefetcher.get`), so a batch can never silently be another's.

A worker that raises (a corrupt record under ``on_corrupt='error'``) stops the pipeline
with its error; a worker that dies (killed, out of memory) is reported as a
:class:`DataWorkerError` within about a second (Grain polls its exit code), not a hang.
Workers run JAX on the CPU only (for the permutations of the order), never on the
accelerator the training process uses.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import time

import numpy as np

from jaxrepro import parallel
from jaxrepro.data import order
from jaxrepro.errors import DataError

# A step waited for data when its batch was decoded more than this after the loop asked
# for it (both times from the machine's monotonic clock, shared by all its processes).
WAIT_THRESHOLD_S = 0.001


class DataWorkerError(DataError):
    """A data worker process died or failed; names the step and the cause."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """The steps ``[start, end)`` of one phase, read from one split."""

    phase: str
    start: int
    end: int
    batch_size: int
    reader: object  # sources.Reader of the phase's train split
    skip_from: int | None = None  # a replay reads `skip_batches` further from this step on
    skip_batches: int = 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which example ids each global step reads on this host. Pure and picklable."""

    data_key: order.HostKey
    remainder: str
    segments: tuple[Segment, ...]
    process_index: int = 0
    process_count: int = 1
    local_devices: int = 1

    def segment(self, step: int) -> Segment:
        for seg in self.segments:
            if seg.start <= step < seg.end:
                return seg
        raise IndexError(f"step {step} is in no segment of the plan")

    def global_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, epochs) of the whole global batch of ``step``."""
        seg = self.segment(step)
        position = step - seg.start
        if seg.skip_from is not None and step >= seg.skip_from:
            position += seg.skip_batches
        return order.batch_ids(
            self.data_key, seg.phase, position, seg.batch_size, len(seg.reader), self.remainder
        )

    def host_rows(self, array: np.ndarray) -> np.ndarray:
        """This host's block of a global batch's rows."""
        return parallel.host_slice(
            array, self.process_index, self.process_count, self.local_devices
        )

    def local_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        ids, epochs = self.global_ids(step)
        return self.host_rows(ids), self.host_rows(epochs)


def materialise(plan: Plan, step: int) -> dict:
    """The batch of ``step`` on this host: what the training step reads, plus bookkeeping."""
    ids, epochs = plan.local_ids(step)
    cpu0 = time.thread_time()
    images, labels, corrupt = plan.segment(step).reader.read(ids)
    return {
        "decode_cpu_s": np.float64(time.thread_time() - cpu0),  # measured, not data
        "image": images,
        "label": labels,
        "id": np.asarray(ids, np.int32),
        "epoch": np.asarray(epochs, np.int32),
        "step": np.int64(step),
        "corrupt": np.array(sorted(corrupt), np.int64),  # records skipped in this batch
        "ready_at": np.float64(time.monotonic()),  # when it was decoded: measured, not data
    }


class Materialise:
    """``step -> batch`` for Grain's ``map``: picklable, so each worker gets the plan."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, step) -> dict:
        return materialise(self.plan, int(step))


def _worker_init(index: int, count: int) -> None:
    """In each worker, before any work: JAX on the CPU only (the order's permutations)."""
    del index, count
    import jax

    jax.config.update("jax_platforms", "cpu")


def _describe_death(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    match = re.search(r"exit code (-?\d+)", str(error))
    if match and int(match.group(1)) < 0:
        try:
            name = signal.Signals(-int(match.group(1))).name
        except ValueError:
            return text
        hint = " (often the out-of-memory killer)" if name == "SIGKILL" else ""
        text = f"a data worker process was killed by {name}{hint}; {text}"
    return text


@dataclasses.dataclass
class WaitStats:
    """How long the training loop waited for data (run.json's ``data_wait``).

    A step waited for data when its batch was not decoded yet when the loop asked for it
    *and* the device had nothing left to compute when the batch came (the steps before it
    done): with asynchronous dispatch the loop asks for batches ahead of the device, and a
    late batch then costs nothing. The wait counted is from the request to the end of the
    batch's decoding (the whole decode for splits decoded in the training process, 0 for
    in-memory ones). ``host_late_steps``: batches that came after the request while the
    device was still busy (no loss). ``host_s``: the loop's time in taking batches. The
    first batch, which includes starting the workers, is reported apart.
    """

    steps: int = 0
    waited_steps: int = 0
    wait_s: float = 0.0
    max_wait_s: float = 0.0
    host_late_steps: int = 0
    host_s: float = 0.0
    first_wait_s: float | None = None

    def add(self, wait_s: float, host_s: float, device_idle: bool = True) -> None:
        if self.first_wait_s is None:
            self.first_wait_s = max(wait_s, host_s)
            return
        self.steps += 1
        self.host_s += host_s
        if wait_s <= WAIT_THRESHOLD_S:
            return
        if not device_idle:
            self.host_late_steps += 1
            return
        self.waited_steps += 1
        self.wait_s += wait_s
        self.max_wait_s = max(self.max_wait_s, wait_s)

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "waited_steps": self.waited_steps,
            "waited_fraction": round(self.waited_steps / self.steps, 4) if self.steps else None,
            "wait_s": round(self.wait_s, 3),
            "max_wait_s": round(self.max_wait_s, 4),
            "host_late_steps": self.host_late_steps,
            "host_s": round(self.host_s, 3),
            "first_wait_s": None if self.first_wait_s is None else round(self.first_wait_s, 3),
            "threshold_s": WAIT_THRESHOLD_S,
        }


class Prefetcher:
    """The batches of ``steps`` (increasing), decoded by ``workers`` processes ahead.

    ``get(step)`` must be called for each of ``steps`` in order. ``workers=0`` decodes in
    this process when asked (the same batches; for tests and comparisons).
    """

    def __init__(self, plan: Plan, steps, *, workers: int, prefetch: int):
        import grain

        if workers < 0 or prefetch < 1:
            raise ValueError(f"need workers >= 0 and prefetch >= 1, got {workers}, {prefetch}")
        self.plan = plan
        self.steps = np.asarray(steps, np.int64)
        if self.steps.ndim != 1 or (np.diff(self.steps) <= 0).any():
            raise ValueError("steps must be a 1-D increasing sequence")
        self.workers, self.prefetch = int(workers), int(prefetch)
        self.wait = WaitStats()
        self.last_wait_s = 0.0
        dataset = grain.MapDataset.source(self.steps).map(Materialise(plan))
        dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.workers:
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.workers, per_worker_buffer_size=self.prefetch
                ),
                worker_init_fn=_worker_init,
            )
        self._iterator = iter(dataset)
        self._position = 0
        self._closed = False

    def covers(self, step: int) -> bool:
        return self._position < len(self.steps) and step >= self.steps[self._position]

    def get(self, step: int) -> dict:
        """The batch of ``step``: image, label, id, epoch (this host's rows), corrupt ids and
        the CPU seconds its decoding took."""
        if self._closed:
            raise RuntimeError("this Prefetcher is closed")
        if self._position >= len(self.steps) or self.steps[self._position] != step:
            expected = self.steps[self._position] if self._position < len(self.steps) else None
            raise RuntimeError(f"asked for step {step}, the pipeline's next step is {expected}")
        asked = time.monotonic()
        try:
            batch = next(self._iterator)
        except DataError:
            self.close()
            raise
        except Exception as error:  # noqa: BLE001 - a worker died or failed: say which step
            self.close()
            raise DataWorkerError(
                f"the data pipeline failed preparing the batch of step {step} "
                f"({self.workers} worker processes): {_describe_death(error)}"
            ) from error
        self.last_wait_s = max(0.0, float(batch["ready_at"]) - asked)
        self.wait.add(self.last_wait_s, time.monotonic() - asked)
        self._position += 1
        ids, _ = self.plan.local_ids(step)
        if int(batch["step"]) != step or not np.array_equal(batch["id"], ids):
            self.close()
            raise DataWorkerError(f"the data pipeline returned another batch for step {step}")
        return batch

    def close(self) -> None:
        """Stops the workers (idempotent)."""
        if not self._closed:
            self._closed = True
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
