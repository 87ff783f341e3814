"""One training run: pretrain then fine-tune, writing the workdir of docs/design.md.

Decide how to start, in this order: (1) validate the config; (2) claim the workdir (a
different config there is refused, the same one resumes); (3) restore the latest complete
checkpoint if there is one, else a branch's origin checkpoint, else initialise from the
``init`` seed; (4) drop the metrics rows the resumed run will write again. Then, at every
global step s:

    phase boundary -> final eval of the old phase, new head + fresh Adam
    eval (if due)  -> eval rows for state s
    save (if due)  -> checkpoint s (async)
    train step s   -> train row s

so a checkpoint at s always follows the rows it implies, and a kill at any moment resumes
to the same bits. At the end: the final eval and save ('done'), a save on SIGTERM, or the
non-finite stop ('diverged'); then run.json's account of the session. Where each job
lives: the run's data, phases, keys, batches and states in ``setup``; the compiled steps
in ``programs``; evaluation in ``evaluation``; batches and data workers in ``feed``; rows,
drop-offs, event files, heartbeat and progress in ``record``; run.json in ``runinfo``; the
workdir's claim in ``jaxrepro.workdir``; checkpoints and their retention in
``jaxrepro.checkpoints``; the hosts' agreement to stop in ``jaxrepro.parallel``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time

import numpy as np

from jaxrepro import config as config_lib
from jaxrepro import machine, parallel, rng
from jaxrepro.checkpoints import Checkpoints
from jaxrepro.errors import DataError, JaxreproError
from jaxrepro.plumbing.gcfreeze import frozen_gc
from jaxrepro.plumbing.sigterm import SigtermFlag
from jaxrepro.train import runinfo
from jaxrepro.train.evaluation import Evaluator
from jaxrepro.train.feed import Feeder
from jaxrepro.train.programs import Programs
from jaxrepro.train.record import Record
from jaxrepro.train.setup import Origin, RunSetup, claimed_config
from jaxrepro.workdir import Workdir, shown

log = logging.getLogger("jaxrepro")


class Hooks:
    """Probes of a run for benchmarks (``jaxrepro bench``); the defaults do nothing.

    ``span(name, step)`` wraps 'eval', 'checkpoint' and 'compile' (the first step of a
    phase: trace and compile); ``dispatch(step)`` is called just before train step
    ``step`` is dispatched.
    """

    @contextlib.contextmanager
    def span(self, name: str, step: int):
        yield

    def dispatch(self, step: int) -> None:
        pass


def run(
    config,
    workdir: str,
    *,
    stop_after: int | None = None,
    origin: Origin | None = None,
    hooks: Hooks | None = None,
):
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns run.json's content.

    ``stop_after``: stop once this many global steps are done, as a crash would (no final
    save; tests of resume). ``origin``: branch from another run's checkpoint (see
    ``jaxrepro.replay``). ``hooks``: timing probes (benchmarks).
    """
    rng.configure()
    config_lib.validate(config)
    parallel.apply_determinism(config.determinism)  # in time only before the backend starts
    machine.apply_portable(config.determinism.portable)  # likewise; refused once too late
    ws = Workdir(workdir)
    resuming = ws.claim_on_all_hosts(claimed_config(config, origin))
    run_info = ws.read_run()
    if resuming and run_info.get("status") in ("done", "diverged"):
        log.info("%s: run already %s; nothing to do", shown(ws.path), run_info["status"])
        return run_info
    training = Training(RunSetup(config, origin), ws, resuming, hooks or Hooks())
    try:
        return training.run(stop_after)
    except BaseException as e:  # record why, keep what is on disk, and re-raise
        # A corrupt record or a dead data worker is said in run.json too; a refusal
        # (JaxreproError) or Ctrl-C is not a failure of the run.
        failed = isinstance(e, DataError) or not isinstance(e, KeyboardInterrupt | JaxreproError)
        if failed and parallel.is_primary():
            ws.update_run(status="failed", error=f"{type(e).__name__}: {str(e)[:2000]}")
        raise


def _due(every: int, phase_step: int) -> bool:
    return phase_step == 0 or (every > 0 and phase_step % every == 0)


class Training:
    """One session of a run: start, the step loop, the end."""

    def __init__(self, setup: RunSetup, ws: Workdir, resuming: bool, hooks: Hooks):
        self.setup = setup
        self.config = setup.config
        self.ws = ws
        self.hooks = hooks
        self.primary = parallel.is_primary()  # only process 0 writes the workdir's files
        self.programs = Programs(setup, hooks)
        self.evaluator = Evaluator(setup, self.programs)
        self.feeder = Feeder(setup)
        self.ckpts = Checkpoints(ws.checkpoint_dir)
        self.resume_step = self.ckpts.latest_step() if resuming else None
        self.info = ws.read_run() if resuming else {}
        self.record = None  # the session's Record, opened once the start is known

    # -- start
    def _start(self):
        """(state, its phase name, first step to run, how: 'init' | 'resume' | 'origin')."""
        if self.resume_step is not None:
            state, phase_name = self.setup.restore(self.ckpts, self.resume_step)
            return state, phase_name, self.resume_step, "resume"
        if self.setup.origin is not None:
            return (*self.setup.restore_origin(), self.setup.origin.step, "origin")
        return self.setup.init_state(), self.setup.first_phase().name, 0, "init"

    def run(self, stop_after: int | None) -> dict:
        try:
            state, state_phase, start, how = self._start()
            self.info = runinfo.start_record(self.info, self.setup, state, start, how)
            if self.primary:
                self.ws.update_run(**self.info)
            nonfinite = int(np.asarray(state.nonfinite))
            state = self.setup.par.replicate(state)
            self.record = Record(
                self.setup, self.ws, start=start, how=how, restored_phase=state_phase,
                nonfinite=nonfinite,
            )  # fmt: skip
            try:
                return self._loop(state, state_phase, start, stop_after)
            finally:
                self.record.close_events()
                self.record.close_progress()
        finally:
            self.feeder.close()

    # -- the loop
    def _loop(self, state, state_phase, start, stop_after) -> dict:
        setup, record, hooks, c = self.setup, self.record, self.hooks, self.config
        status, t_start = "running", time.perf_counter()
        self.feeder.start(start)
        with SigtermFlag() as sigterm, frozen_gc():  # preemption: checkpoint, exit cleanly
            s, stopping = start, False
            while s < setup.end:
                phase = setup.phase_of(s)
                save_due = s == phase.start or _due(c.checkpoint.every, s)
                eval_due = _due(phase.eval_every, s - phase.start)
                if state_phase != phase.name or eval_due or save_due:
                    record.flush()  # rows up to s-1 first; a stop among them ends the run here
                    if record.stop_at is not None:
                        break
                if state_phase != phase.name:  # the pretrain -> fine-tune boundary
                    self._evaluate(setup.phase_named(state_phase), state, s)
                    state, state_phase = setup.to_finetune(state, phase), phase.name
                if eval_due:
                    self._evaluate(phase, state, s)
                    gc.freeze()  # what the eval (and its first compile) left stays put
                if save_due:
                    self._save(s, state, state_phase)
                last = record.pending[-1][3] if record.pending else None
                batch, epoch = self.feeder.device_batch(phase, s, last)
                fn = self.programs.train_fn(phase, state, batch)
                hooks.dispatch(s)
                state, m = fn(state, batch, *setup.step_inputs(phase))
                record.dispatched(phase, s, epoch, m)
                s += 1
                if record.stop_at is not None:
                    break
                stopping = parallel.agreed_stop(sigterm.requested, s)
                if stopping or (stop_after is not None and s >= stop_after):
                    break
                if s == phase.start + 1 or s == start + 1:
                    gc.freeze()  # after the step's compile
                record.stepped(phase, s)  # progress line, heartbeat
            record.flush()
            if record.stop_at is not None:
                status, s = "diverged", record.stop_at
            elif s >= setup.end:
                self._evaluate(setup.phase_named(state_phase), state, s)
                self._save(s, state, state_phase)
                status = "done"
            elif stopping:
                self._save(s, state, state_phase)
                log.warning("SIGTERM: saved checkpoint %d; rerun the same command to resume", s)
        self.ckpts.close()
        record.close()
        return self._finish(state, status, s, time.perf_counter() - t_start)

    def _evaluate(self, phase, state, step: int) -> None:
        with self.hooks.span("eval", step):
            self.record.log_rows(self.evaluator.evaluate(phase, state, step))
        self.record.flush_events()

    def _save(self, step, state, phase_name):
        """Checkpoint ``step`` unless it exists (orbax never overwrites a step)."""
        if step in self.ckpts.steps():
            return
        with self.hooks.span("checkpoint", step):
            self.record.flush()  # rows up to step-1 reach disk before the checkpoint
            self.record.flush_events()  # ... and the event files: a resume purges only later
            self.ckpts.save(step, state, {"phase": phase_name, "model": self.config.model.name})
            c = self.config.checkpoint
            protected = set()
            if c.keep_phase_starts:  # a study's branches start there
                protected = {p.start for p in self.setup.phases[1:] if p.steps}
            self.ckpts.retain(
                c.keep_last, c.keep_every, protected, before=self.record.dropoff_steps()
            )

    # -- the end
    def _finish(self, state, status, step, wall) -> dict:
        self.info.update(
            status=status,
            step=int(step),
            **self.record.summary(),
            compile_time_s=self.programs.compile_s,
            programs=self.programs.how,
            wall_time_s=round(wall, 3),
            **self.feeder.report(),
        )
        if status in ("done", "diverged"):
            self.info.update(runinfo.end_hashes(state))
        if self.primary:
            self.ws.update_run(**self.info)
        self.record.end_heartbeat(step, status)
        log.info("%s: %s at step %d in %.1fs", shown(self.ws.path), status, step, wall)
        return self.info
