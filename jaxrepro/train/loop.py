"""One training run: pretrain then fine-tune, writing the workdir of docs/design.md.

Decide how to start, in this order: (1) validate the config; (2) claim the workdir (a
different config there is refused, the same one resumes); (3) restore the latest complete
checkpoint if there is one, else initialise from the ``init`` seed; (4) drop the metrics
rows the resumed run will write again. Then, at every global step s:

    phase boundary -> final eval of the old phase, new head + fresh Adam
    eval (if due)  -> eval rows for state s
    save (if due)  -> checkpoint s (async)
    train step s   -> train row s

so a checkpoint at s always follows the rows it implies, and a kill at any moment resumes
to the same bits. Where each job lives: the run's data, phases, keys, batches and states
in ``setup``; the compiled steps in ``programs``; evaluation in ``evaluation``; rows,
drop-offs, event files, heartbeat and progress in ``record``; run.json's platform in
``runinfo``; checkpoints in ``jaxrepro.checkpoints``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time

import numpy as np

from jaxrepro import config as config_lib
from jaxrepro import machine, parallel, rng
from jaxrepro.checkpoints import Checkpoints, protected_steps
from jaxrepro.errors import CheckpointError, DataError, JaxreproError, WorkdirError
from jaxrepro.plumbing import hashing
from jaxrepro.plumbing.sigterm import SigtermFlag
from jaxrepro.train import runinfo
from jaxrepro.train.evaluation import Evaluator
from jaxrepro.train.feed import Feeder
from jaxrepro.train.programs import Programs
from jaxrepro.train.record import Record
from jaxrepro.train.setup import Origin, RunSetup
from jaxrepro.workdir import Workdir, shown

log = logging.getLogger("jaxrepro")

_STOP_CHECK_EVERY = 10  # multi-host: steps between SIGTERM agreements (each a collective)


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
    claimed = config_lib.to_dict(config)
    if origin is not None:
        claimed["replay"] = dict(
            origin.info, from_step=origin.step, until=origin.until, skip_batches=origin.skip_batches
        )
    resuming = _claim(ws, claimed)
    run_info = ws.read_run()
    if resuming and run_info.get("status") in ("done", "diverged"):
        log.info("%s: run already %s; nothing to do", shown(ws.path), run_info["status"])
        return run_info
    training = Training(RunSetup(config, origin), ws, resuming, hooks or Hooks())
    try:
        return training.run(stop_after)
    except BaseException as e:  # record why, keep what is on disk, and re-raise
        if not isinstance(e, KeyboardInterrupt | JaxreproError) and parallel.is_primary():
            ws.update_run(status="failed", error=f"{type(e).__name__}: {str(e)[:2000]}")
        raise


def _claim(ws: Workdir, claimed: dict) -> bool:
    """Process 0 claims the workdir; the other hosts follow its verdict (and its refusal)."""
    verdict, error = -1, None
    if parallel.is_primary():
        try:
            verdict = int(ws.claim(claimed))
        except WorkdirError as e:
            error = e
    verdict = parallel.broadcast_int(verdict)
    if error is not None:
        raise error
    if verdict < 0:
        raise WorkdirError(f"process 0 refused the workdir {ws.path} (its log says why)")
    return bool(verdict)


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
        self.record = None

    # -- start
    def _start(self):
        """(state, its phase name, first step to run, how: 'init' | 'resume' | 'origin')."""
        origin = self.setup.origin
        if self.resume_step is not None:
            state, phase_name = self.setup.restore(self.ckpts, self.resume_step)
            return state, phase_name, self.resume_step, "resume"
        if origin is not None:
            src = Checkpoints(origin.checkpoint_dir, read_only=True)
            if origin.step not in src.steps():
                raise CheckpointError(
                    f"no checkpoint {origin.step} in {src.directory} (have {src.steps()})"
                )
            state, phase_name = self.setup.restore(src, origin.step, recorded=origin.config)
            src.close()
            return state, phase_name, origin.step, "origin"
        return self.setup.init_state(), self.setup.first_phase().name, 0, "init"

    def run(self, stop_after: int | None) -> dict:
        try:
            return self._run(stop_after)
        except DataError as e:  # a corrupt record, a dead data worker: say so in run.json
            if self.primary:
                self.ws.update_run(status="failed", error=f"{type(e).__name__}: {str(e)[:2000]}")
            raise
        finally:
            self.feeder.close()

    def _run(self, stop_after: int | None) -> dict:
        state, state_phase, start, how = self._start()
        self.info = runinfo.start_record(self.info, self.setup, state, start, how)
        if self.primary:
            self.ws.update_run(**self.info)
        state = self.setup.par.replicate(state)
        origin = self.setup.origin
        self.record = Record(
            self.setup,
            self.ws,
            start=start,
            how=how,
            restored_phase=state_phase,
            # A branch judges its first steps against the original's recent past, so a
            # drop-off just after the restore step is seen as in the original run.
            history=origin.history if how == "origin" and origin is not None else (),
            nonfinite=int(np.asarray(state.nonfinite)),
        )
        try:
            return self._loop(state, state_phase, start, stop_after)
        finally:
            self.record.close_events()
            self.record.close_progress()

    # -- the loop
    def _loop(self, state, state_phase, start, stop_after) -> dict:
        setup, record, hooks, c = self.setup, self.record, self.hooks, self.config
        status, t_start, last_print, done_steps = "running", time.perf_counter(), 0.0, 0
        beat_every = c.runtime.heartbeat_every_s
        record.heartbeat(start, None)
        next_beat = t_start + beat_every
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
                done_steps += 1
                if record.stop_at is not None:
                    break
                stopping = self._agreed_stop(sigterm.requested, s)
                if stopping or (stop_after is not None and s >= stop_after):
                    break
                now = time.perf_counter()
                if s == phase.start + 1 or done_steps == 1:
                    gc.freeze()  # after the step's compile
                if done_steps == 1:
                    t_first = now  # steps/s from here on: compile time is reported apart
                elif now - last_print > c.runtime.progress_every_s:
                    last_print = now  # progress itself is reported as metrics are read
                    record.flush_events()
                if now >= next_beat and done_steps > 1:  # off the hot path: every few s
                    next_beat = now + beat_every
                    record.heartbeat(s, (done_steps - 1) / max(now - t_first, 1e-9))
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
            events = [e["step"] for e in self.record.detector.events]
            pending = self.record.detector.pending_from()  # an unconfirmed episode's onset
            if pending is not None:
                events.append(pending)
            protected = protected_steps(self.ckpts.steps(), events)
            if c.keep_phase_starts:  # a study's branches start there
                protected |= {p.start for p in self.setup.phases[1:] if p.steps}
            self.ckpts.retain(c.keep_last, c.keep_every, protected)

    def _agreed_stop(self, requested: bool, step: int) -> bool:
        """Whether to stop for SIGTERM at ``step``: on every host alike.

        Multi-host, the hosts compare their flags every few steps only (a collective), so
        they all stop, and save, at the same step.
        """
        if self.setup.par.process_count == 1:
            return requested
        return step % _STOP_CHECK_EVERY == 0 and parallel.any_process(requested)

    def _finish(self, state, status, step, wall) -> dict:
        stats, warnings = self.record.input_report()
        fields = dict(
            status=status,
            step=int(step),
            input_stats=stats,
            warnings=warnings,
            compile_time_s=self.programs.compile_s,
            wall_time_s=round(wall, 3),
            # Counted as the steps were read: a diverged run's no-op steps after its stop
            # (dispatched before the host read the stop) are not part of its record.
            nonfinite_steps=self.record.nonfinite,
            dropoff_count=len(self.record.detector.events),
            **self.feeder.report(),
        )
        if status in ("done", "diverged"):
            fields["final_param_hash"] = hashing.tree_hash(state.params)
            fields["final_state_hash"] = hashing.tree_hash(
                (state.params, state.batch_stats, state.opt_state)
            )
        self.info.update(fields)
        if self.primary:
            self.ws.update_run(**self.info)
        self.record.end_heartbeat(step, status)
        log.info("%s: %s at step %d in %.1fs", shown(self.ws.path), status, step, wall)
        return self.info
