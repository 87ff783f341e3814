"""The compiled programs of a run: one train step and one eval step per phase.

Compiled once per phase and process (from the persistent cache where it has them); the
compile times are kept for run.json.
"""

from __future__ import annotations

import contextlib
import time

import jax

from jaxrepro.train.step import make_eval_step, make_train_step, with_packed_metrics


class Programs:
    """``train_fn(phase, state, batch)`` and ``eval_fn(phase)`` of a ``RunSetup``."""

    def __init__(self, setup, hooks=None):
        self.setup = setup
        self.hooks = hooks  # a loop.Hooks: the compile of each phase's step is a 'compile' span
        self.config = setup.config
        # Device-count-invariant mode evaluates on one device, every host all rows: the same
        # program on any layout, so eval rows are bitwise invariant too (not only train rows).
        self.eval_one_device = bool(self.config.determinism.device_invariant)
        self.compile_s: dict[str, float] = {}
        self._train: dict = {}
        self._eval: dict = {}

    def _static(self, phase) -> dict:
        c = self.config
        return dict(
            module=phase.module,
            tx=phase.tx,
            lr_fn=phase.lr_fn,
            phase_start=phase.start,
            augment_cfg=c.data.augment,
            mean=tuple(c.data.normalize.mean),
            std=tuple(c.data.normalize.std),
            policy=c.train.nonfinite_policy,
        )

    def train_fn(self, phase, state, batch):
        """The compiled train step of ``phase`` (metrics packed: one fetch a step)."""
        if phase.name not in self._train:
            par = self.setup.par
            if self.config.determinism.device_invariant:
                from jaxrepro.train import invariant  # opt-in: grouped, fixed-order reductions

                fn = invariant.make_invariant_train_step(
                    mesh=par.mesh,
                    groups=self.config.determinism.groups,
                    packed_metrics=True,
                    **self._static(phase),
                )
            else:  # batch sharded; metrics as one vector
                fn = par.jit_train_step(with_packed_metrics(make_train_step(**self._static(phase))))
            t0 = time.perf_counter()
            with self.hooks.span("compile", phase.start) if self.hooks else _nothing():
                compiled = fn.lower(state, batch, *self.setup.step_inputs(phase)).compile()
            self.compile_s[f"train_{phase.name}"] = round(time.perf_counter() - t0, 3)
            self._train[phase.name] = compiled
        return self._train[phase.name]

    def eval_fn(self, phase):
        """The jitted eval step of ``phase``: sums of loss and correct over a batch."""
        if phase.name not in self._eval:
            c = self.config
            fn = make_eval_step(
                module=phase.module,
                mean=tuple(c.data.normalize.mean),
                std=tuple(c.data.normalize.std),
            )
            self._eval[phase.name] = (
                jax.jit(fn) if self.eval_one_device else self.setup.par.jit_eval_step(fn)
            )
        return self._eval[phase.name]

    def eval_batch_size(self) -> int:
        bs = self.config.train.eval_batch_size
        return bs if self.eval_one_device else self.setup.par.round_up(bs)


@contextlib.contextmanager
def _nothing():
    yield
