"""Python's full garbage collections kept out of a hot loop's way (``gc.freeze``)."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def frozen_gc():
    """Keeps Python's full garbage collections out of the step loop's way.

    A full (generation 2) collection walks every tracked object: with jax's tracing
    caches and the compiled steps in the process, 165-290 ms each, about one per 160 steps
    of a digits run (results/bench/NOTES.md, "End to end"). ``gc.freeze()`` moves the objects
    alive now out of the collector's reach; the loop calls it again after each compile and
    eval. Objects are still freed by reference counting as ever; only cyclic garbage made
    before a freeze waits for the ``gc.unfreeze()`` at the end, where it is collected.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
