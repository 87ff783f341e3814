"""The compiled programs of a run: one train step and one eval step per phase.

Compiled once per phase and process (from the persistent cache where it has them), and the
train step is loaded without a trace where the program cache has it; the compile times are
kept for run.json.
"""

from __future__ import annotations

import contextlib
import time

import jax

from jaxrepro import config as config_lib
from jaxrepro.plumbing import program_cache
from jaxrepro.train.step import make_eval_step, make_train_step, with_packed_metrics

# Config fields that do not enter a compiled program (tests/test_program_cache.py lowers the
# train step with each of them changed and finds the same program): left out of its key, so
# that the runs of a study, which differ in seeds, share one program.
PROGRAM_FREE_FIELDS = (
    "seed",
    "seeds",
    "init_from",
    "checkpoint",
    "runtime",
    "dropoff",
    "diagnose",
    "data.data_dir",
)


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
        self.how: dict[str, str] = {}  # per program: "loaded" (program cache) or "compiled"
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
            with self.hooks.span("compile", phase.start) if self.hooks else _nothing():
                self.train_job(phase, state, batch)()
        return self._train[phase.name]

    def describe(self, phase, program: str) -> dict:
        """What a program of ``phase`` is built from, beside its arguments: the config less
        the fields that do not enter a program (PROGRAM_FREE_FIELDS), the resolved
        convolution and the phase's facts. The program cache's key."""
        config = config_lib.to_dict(self.config)
        for dotted in PROGRAM_FREE_FIELDS:
            *parents, last = dotted.split(".")
            node = config
            for p in parents:
                node = node.get(p, {})
            node.pop(last, None)
        return {
            "program": program,
            "config": config,
            "conv_impl": self.setup.conv_impl,
            "phase": [phase.name, phase.start, phase.steps, phase.batch_size],
            "eval_one_device": self.eval_one_device,
        }

    def train_job(self, phase, state, batch):
        """Gets the train step of ``phase`` ready for ``state`` and ``batch`` (arrays, or their
        shapes with the mesh's shardings). What needs the interpreter happens now: the cache
        key, and on a miss the trace and the lowering. The rest is returned as a callable
        that loads the stored program (jaxrepro/plumbing/program_cache.py) or compiles it
        (from JAX's persistent cache, where it is there) and keeps it as the phase's step;
        native code, it may run in another thread."""
        t0 = time.perf_counter()
        args = (state, batch, *self.setup.step_inputs(phase))
        description = self.describe(phase, "train")
        key = program_cache.key(description, args) if program_cache.directory() else None
        lowered = None if program_cache.stored(key) else self._lower_train(phase, args)
        prepared = time.perf_counter() - t0

        def finish():
            t1 = time.perf_counter()
            compiled = program_cache.load(key, args) if lowered is None else None
            how = "loaded"
            if compiled is None:
                with program_cache.capturing() as capture:
                    compiled = (lowered or self._lower_train(phase, args)).compile()
                how = "compiled"
                if key is not None:
                    program_cache.save(key, compiled, description, capture)
            self.compile_s[f"train_{phase.name}"] = round(prepared + time.perf_counter() - t1, 3)
            self.how[f"train_{phase.name}"] = how
            self._train[phase.name] = compiled
            return compiled

        return finish

    def _lower_train(self, phase, args):
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
        return fn.lower(*args)

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
