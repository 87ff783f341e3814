"""Evaluation: every eval split of a phase, as metrics rows.

Eval batches are fixed (the split in order, padded to the batch size with masked rows)
and cut once per split; in device-count-invariant mode every host evaluates all rows on
one device, so eval rows are the same bits on any layout.
"""

from __future__ import annotations

import jax
import numpy as np


def eval_row(phase, step: int, split: str, loss_sum, correct, n: int) -> dict:
    """The metrics.jsonl row of an eval of ``split`` at ``step``, from sums over its n examples."""
    return {
        "kind": "eval",
        "step": step,
        "phase": phase.name,
        "phase_step": step - phase.start,
        "split": split,
        "loss": float(loss_sum / n),
        "accuracy": float(correct / n),
        "n": n,
    }


class Evaluator:
    """``evaluate(phase, state, step)`` -> the eval rows of ``phase``'s splits at ``step``."""

    def __init__(self, setup, programs):
        self.setup = setup
        self.programs = programs
        self._batches: dict[str, list] = {}

    def batches(self, split: str, src) -> list[tuple]:
        """This host's rows of every eval batch (padded to a multiple of the device count)."""
        if split not in self._batches:
            par, one_device = self.setup.par, self.programs.eval_one_device
            bs = self.programs.eval_batch_size()
            n = len(src)
            batches = []
            for i in range(0, n, bs):
                global_ids = np.arange(i, i + bs)
                ids = np.where(global_ids < n, global_ids, -1)
                if not one_device:
                    ids = par.host_slice(ids)
                rows = len(ids)
                ids = ids[ids >= 0]  # padding sits at the end of the batch, so of each slice
                images, labels = src.get(ids)
                pad = rows - len(ids)
                mask = np.concatenate([np.ones(len(ids), bool), np.zeros(pad, bool)])
                images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
                labels = np.concatenate([labels, np.zeros(pad, labels.dtype)]).astype(np.int32)
                batches.append((images, labels, mask))
            self._batches[split] = batches
        return self._batches[split]

    def evaluate(self, phase, state, step: int) -> list[dict]:
        rows = []
        fn = self.programs.eval_fn(phase)
        bs = self.programs.eval_batch_size()
        one_device = self.programs.eval_one_device
        if one_device:
            # This host's copy of the replicated state, on its first device (no transfer).
            params, stats = jax.tree.map(
                lambda a: a.addressable_data(0), (state.params, state.batch_stats)
            )
        for split, src in self.setup.eval_sets(phase):
            if one_device:
                sums = [fn(params, stats, *b) for b in self.batches(split, src)]
            else:
                sums = [
                    fn(state.params, state.batch_stats, *self.setup.par.shard_batch(b, bs))
                    for b in self.batches(split, src)
                ]
            sums = jax.device_get(sums)
            loss_sum = sum(s["loss_sum"] for s in sums)
            correct = sum(s["correct"] for s in sums)
            rows.append(eval_row(phase, step, split, loss_sum, correct, len(src)))
        return rows
