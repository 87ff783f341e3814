"""Device-count-invariant training (opt-in): the same bits on 1, 2, 4 or 8 devices.

``make_invariant_train_step`` is a drop-in for ``jaxrepro.train.step.make_train_step``
over a Mesh with a 'data' axis; ``setup_for_replay`` gives the process setup (XLA flags,
CPU threads) that the bits are conditional on. See the modules' docstrings for why each
piece is what it is.
"""

from jaxrepro.train.invariant.reduce import combine, combine_trees, tree_sum
from jaxrepro.train.invariant.setup import apply_env_threads, differences, setup_for_replay
from jaxrepro.train.invariant.step import (
    batch_sharding,
    check_layout,
    data_mesh,
    invariant_train_step,
    make_invariant_train_step,
    replicated,
)

__all__ = [
    "apply_env_threads",
    "batch_sharding",
    "check_layout",
    "combine",
    "combine_trees",
    "data_mesh",
    "differences",
    "invariant_train_step",
    "make_invariant_train_step",
    "replicated",
    "setup_for_replay",
    "tree_sum",
]
