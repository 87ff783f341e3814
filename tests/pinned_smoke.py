"""The smoke config's pinned bits: a table of hashes and metrics rows per platform.

Each entry of ``tests/pinned/smoke.json`` holds a platform fingerprint (jaxrepro.machine),
the smoke run's initial and final parameter hashes there, and the file of all its metrics
rows. ``tests/test_pinned.py`` runs the smoke config natively and in portable mode and
compares with the entry of its fingerprint; a platform with no entry is skipped, with the
reason. A change that alters the bits updates this table in the same commit.

Record this machine's entries (after checking why the bits moved, if they did):

    .venv/bin/python tests/pinned_smoke.py record native
    .venv/bin/python tests/pinned_smoke.py record portable
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TABLE = os.path.join(HERE, "pinned", "smoke.json")
THREADS = 2  # the runs are pinned to this many CPUs, so bigger machines match too


def load_table() -> list[dict]:
    with open(TABLE) as f:
        return json.load(f)["entries"]


def start_smoke(workdir: str, data_dir: str, *, portable: bool) -> subprocess.Popen | None:
    """Starts ``jaxrepro train`` of the smoke config on ``THREADS`` CPUs; None if too few."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < THREADS:
        return None
    env = dict(os.environ, JAXREPRO_HUGEPAGES="0")
    env.pop("XLA_FLAGS", None)  # native means no flags; portable mode sets its own
    cmd = [
        sys.executable, "-m", "jaxrepro", "train",
        "--config=" + os.path.join(REPO, "configs", "digits.py") + ":smoke",
        f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
        f"--config.determinism.portable={portable}",
    ]  # fmt: skip
    # The child pins itself, then becomes the CLI (no preexec_fn: fork with JAX's threads).
    pin = (
        "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    )
    pinned = ",".join(map(str, cpus[:THREADS]))
    return subprocess.Popen(
        [sys.executable, "-c", pin, pinned, *cmd[1:]],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, workdir: str) -> tuple[dict, list[str]]:
    """Waits for a run started by ``start_smoke``: (run.json, metrics lines)."""
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"smoke run failed ({proc.returncode}): {out[-3000:]}")
    with open(os.path.join(workdir, "run.json")) as f:
        info = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = f.read().splitlines()
    return info, rows


def entry_for(fingerprint: dict, table: list[dict]) -> dict | None:
    for e in table:
        if e["fingerprint"] == fingerprint:
            return e
    return None


def rows_of(entry: dict) -> list[str]:
    with open(os.path.join(HERE, "pinned", entry["rows"])) as f:
        return f.read().splitlines()


def first_difference(got: list[str], want: list[str]) -> str | None:
    """Where two row lists first differ (every row, and their count), or None."""
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"row {i}: got {a} want {b}"
    if len(got) != len(want):
        return f"{len(got)} rows, the table has {len(want)}"
    return None


def record(mode: str) -> None:
    from jaxrepro import machine

    portable = mode == "portable"
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "run")
        proc = start_smoke(work, os.path.join(tmp, "tfds"), portable=portable)
        if proc is None:
            raise SystemExit(f"needs {THREADS} CPUs")
        info, rows = finish(proc, work)
    fp = info["platform"]["fingerprint"]
    name = f"smoke_{machine.fingerprint_id(fp)}.jsonl"
    with open(os.path.join(HERE, "pinned", name), "w") as f:
        f.write("\n".join(rows) + "\n")
    table = [e for e in load_table() if e["fingerprint"] != fp]
    cpu = info["platform"]["cpu"]
    table.append({
        "mode": mode,
        "fingerprint": fp,
        "init_param_hash": info["init_param_hash"],
        "final_param_hash": info["final_param_hash"],
        "rows": name,
        "measured_on": f"{cpu.get('vendor')} family {cpu.get('family')} model "
                       f"{cpu.get('model')} ({cpu.get('model_name')}), caches "
                       f"{cpu.get('caches_kib')} KiB, code {info['code']['git_commit']}",
    })  # fmt: skip
    with open(TABLE, "w") as f:
        json.dump({"entries": table}, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"recorded {mode} entry {name}: {info['final_param_hash']}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "record" or sys.argv[2] not in ("native", "portable"):
        raise SystemExit("usage: pinned_smoke.py record native|portable")
    sys.path.insert(0, REPO)
    record(sys.argv[2])
