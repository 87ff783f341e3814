"""A run's working directory: the interface other tools read (docs/design.md).

WORKDIR/config.json    the full resolved config
WORKDIR/run.json       metadata, seeds, hashes, status
WORKDIR/metrics.jsonl  one row per logged step and per eval
WORKDIR/dropoffs.json  detected drop-off events
WORKDIR/heartbeat.json the running process: host, pid, step, steps/s (``jaxrepro status``)
WORKDIR/tb/            TensorBoard event files (jaxrepro.tbevents)
WORKDIR/checkpoints/   orbax steps
WORKDIR/replays/NAME/  branch runs
"""

from __future__ import annotations

import os

from jaxrepro import config as config_lib
from jaxrepro.errors import WorkdirError
from jaxrepro.plumbing import jsonio

STATUSES = ("running", "done", "diverged", "failed")


def shown(path: str) -> str:
    """``path`` for a log line: relative to the current directory when inside it.

    A study's runs log where they are; their logs are kept with the results, and must
    not carry the absolute path of the machine the study ran on.
    """
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


class Workdir:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def config_path(self):
        return self.file("config.json")

    @property
    def run_path(self):
        return self.file("run.json")

    @property
    def metrics_path(self):
        return self.file("metrics.jsonl")

    @property
    def dropoffs_path(self):
        return self.file("dropoffs.json")

    @property
    def heartbeat_path(self):
        return self.file("heartbeat.json")

    @property
    def checkpoint_dir(self):
        return self.file("checkpoints")

    def exists(self) -> bool:
        return os.path.exists(self.config_path)

    def stored_config(self) -> dict:
        try:
            return jsonio.read_json(self.config_path)
        except (OSError, ValueError) as e:
            raise WorkdirError(f"{self.config_path} is unreadable: {e}") from e

    def claim(self, config_dict: dict) -> bool:
        """Makes the workdir ours. Returns True when it already held this config (resume).

        Refuses, naming the differing fields, when it holds another config; refuses a
        non-empty directory that is not a jaxrepro run, so nothing on disk is overwritten.
        """
        if self.exists():
            differing = config_lib.diff(self.stored_config(), config_dict)
            if differing:
                shown = ", ".join(differing[:20]) + (" …" if len(differing) > 20 else "")
                raise WorkdirError(
                    f"workdir {self.path} holds a run with a different config "
                    f"(differing fields: {shown}); use another --workdir"
                )
            return True
        if os.path.isdir(self.path) and os.listdir(self.path):
            raise WorkdirError(
                f"workdir {self.path} is not empty and holds no jaxrepro run (no config.json); "
                "refusing to write into it"
            )
        os.makedirs(self.path, exist_ok=True)
        jsonio.write_json(self.config_path, config_dict)
        return False

    def claim_on_all_hosts(self, config_dict: dict) -> bool:
        """``claim`` on process 0; the other hosts follow its verdict (and its refusal)."""
        from jaxrepro import parallel  # reading a workdir (jaxrepro status) needs no JAX

        verdict, error = -1, None
        if parallel.is_primary():
            try:
                verdict = int(self.claim(config_dict))
            except WorkdirError as e:
                error = e
        verdict = parallel.broadcast_int(verdict)
        if error is not None:
            raise error
        if verdict < 0:
            raise WorkdirError(f"process 0 refused the workdir {self.path} (its log says why)")
        return bool(verdict)

    def read_run(self) -> dict:
        return jsonio.read_json(self.run_path) if os.path.exists(self.run_path) else {}

    def update_run(self, **fields) -> dict:
        run = self.read_run()
        run.update(fields)
        jsonio.write_json(self.run_path, run)
        return run

    def write_heartbeat(self, fields: dict) -> None:
        """Replaces heartbeat.json (atomically, without fsync: it only says who is alive)."""
        tmp = f"{self.heartbeat_path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(jsonio.dumps(fields, sort_keys=True) + "\n")
        os.replace(tmp, self.heartbeat_path)

    def read_heartbeat(self) -> dict | None:
        try:
            return jsonio.read_json(self.heartbeat_path)
        except (OSError, ValueError):
            return None

    def metrics(self) -> list[dict]:
        return jsonio.read_jsonl(self.metrics_path)


class MetricsWriter:
    """Appends rows to metrics.jsonl, flushed per row so a kill loses at most the last line."""

    def __init__(self, path: str, keep_before_step: int | None, restored_phase: str | None = None):
        """Opens for append, first dropping rows the resumed run will write again.

        After a resume from checkpoint ``keep_before_step`` (whose state is in phase
        ``restored_phase``), every row of a later step and every row of that step in that
        phase is recomputed; a partial last line from a kill is dropped too. ``None``: a
        fresh run, start empty.
        """
        if keep_before_step is None:
            rows = []
        else:
            rows = [
                r for r in jsonio.read_jsonl(path) if _kept(r, keep_before_step, restored_phase)
            ]
        jsonio.write_jsonl(path, rows)
        self.rows = rows
        self._f = open(path, "a")  # noqa: SIM115 - held open for the run

    def write(self, row: dict) -> None:
        self._f.write(jsonio.dumps(row) + "\n")
        self._f.flush()
        self.rows.append(row)

    def close(self):
        self._f.close()


def _kept(row: dict, restore_step: int, restored_phase: str | None) -> bool:
    if row["step"] < restore_step:
        return True
    # At a phase boundary, the old phase's final eval (step == boundary) is not redone:
    # the restored state is already the new phase's.
    return row["step"] == restore_step and row["kind"] == "eval" and row["phase"] != restored_phase
