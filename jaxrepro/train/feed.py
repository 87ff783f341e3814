"""Feeding the step: each train step's batch, from memory, decoded here, or from workers.

Splits held in memory are sliced in the training process. A train split read lazily is
decoded by ``runtime.data_workers`` worker processes ahead of the step
(jaxrepro/data/pipeline.py), or in the training process when there are none. The batch
is the same whatever the route; the feeder checks that each batch holds the ids the
order says, counts how long steps waited for their batch, and keeps the corrupt records
met, for run.json.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from jaxrepro import data as data_lib
from jaxrepro.data import pipeline as pipeline_lib

log = logging.getLogger("jaxrepro")


def make_plan(setup) -> pipeline_lib.Plan:
    """Which ids every step reads (the data order, a replay's skip, this host's rows)."""
    origin, par = setup.origin, setup.par
    segments = tuple(
        pipeline_lib.Segment(
            phase=p.name,
            start=p.start,
            end=p.end,
            batch_size=p.batch_size,
            reader=setup.data.train(p.name).reader,
            skip_from=None if origin is None else origin.step,
            skip_batches=0 if origin is None else origin.skip_batches,
        )
        for p in setup.phases
        if p.steps > 0
    )
    return pipeline_lib.Plan(
        data_key=setup.data_key,
        remainder=setup.config.data.remainder,
        segments=segments,
        process_index=par.process_index,
        process_count=par.process_count,
        local_devices=par.local_devices,
    )


class Feeder:
    """``device_batch(phase, step)`` for the training loop; ``start`` the workers first."""

    def __init__(self, setup):
        self.setup = setup
        self.config = setup.config
        self.plan = make_plan(setup)
        self.prefetcher = None  # the worker pipeline of the run's lazily read train steps
        self.wait = pipeline_lib.WaitStats()  # how long steps waited for their batch

    def start(self, start: int) -> None:
        """Worker processes decode the batches of the lazily read train steps from ``start``
        on, ahead of the step (``runtime.data_workers`` > 0; in-memory splits need none)."""
        setup = self.setup
        workers = int(self.config.runtime.data_workers)
        lazy = [
            np.arange(max(start, p.start), min(setup.end, p.end))
            for p in setup.phases
            if not setup.data.train(p.name).in_memory
        ]
        steps = np.concatenate([np.zeros(0, np.int64), *lazy])
        if workers > 0 and len(steps):
            self.prefetcher = pipeline_lib.Prefetcher(
                self.plan, steps, workers=workers, prefetch=int(self.config.runtime.data_prefetch)
            )
            log.info("%d data worker processes decode the batches of %d steps ahead", workers,
                     len(steps))  # fmt: skip

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    def device_batch(self, phase, step: int, last_dispatched=None) -> tuple[dict, int]:
        """(the global batch of ``step`` sharded over the mesh, its first example's epoch).

        ``last_dispatched``: the newest dispatched step's output, to tell whether the device
        was idle while the batch was awaited (the data-wait statistics).
        """
        setup = self.setup
        src = setup.data.train(phase.name)
        t0 = time.monotonic()
        if self.prefetcher is not None and not src.in_memory:
            batch = self.prefetcher.get(step)
            epoch = int(self.plan.global_ids(step)[1][0])
            self._note_corrupt(src, batch["corrupt"])
            local = {k: batch[k] for k in ("image", "label", "id", "epoch")}
            wait = self.prefetcher.last_wait_s
        else:
            ids, epochs = setup.batch_ids(phase, step)
            local = setup.read(phase, setup.par.host_slice(ids), setup.par.host_slice(epochs))
            epoch = int(epochs[0])
            wait = 0.0 if src.in_memory else time.monotonic() - t0  # decoded here, now
        idle = last_dispatched is None or last_dispatched.is_ready()
        self.wait.add(wait, time.monotonic() - t0, device_idle=idle)
        return setup.par.shard_batch(local, phase.batch_size), epoch

    @staticmethod
    def _note_corrupt(src, ids) -> None:
        """Records the corrupt records a worker skipped (with their error, read here once)."""
        for index in map(int, ids):
            if index not in src.corrupt:
                try:
                    src.reader.example(index)
                    src.corrupt[index] = "decoded here, not in the worker"
                except data_lib.CorruptRecordError as error:
                    src.corrupt[index] = str(error.__cause__)
                log.warning("skipped corrupt record %d of %s %s", index, src.name, src.split)

    def report(self) -> dict:
        """run.json's data fields: the pipeline, the waits, every corrupt record met."""
        data = self.setup.data
        seen = {}
        for src in (data.source_train, data.source_eval, data.target_train, data.target_eval):
            for index, error in src.corrupt.items():
                seen[(src.name, src.split, index)] = error
        return {
            "data_pipeline": {
                "workers": int(self.config.runtime.data_workers),
                "prefetch": int(self.config.runtime.data_prefetch),
                "lazy_train_splits": [
                    p.name for p in self.setup.phases if not data.train(p.name).in_memory
                ],
                "decoder": data_lib.decoder_version(),
            },
            "data_wait": self.wait.to_dict(),
            "corrupt_records": [
                {"dataset": name, "split": split, "id": index, "error": error}
                for (name, split, index), error in sorted(seen.items())
            ],
        }
