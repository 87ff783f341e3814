"""Audit a config's determinism: N steps twice, and once killed half way and resumed.

Reports bitwise agreement of every metric row and every array of the final state, and
where they differ, the first differing step and the differing leaves.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from jaxrepro import jsonio
from jaxrepro.checkpoints import Checkpoints
from jaxrepro.errors import ConfigError
from jaxrepro.replay import compare
from jaxrepro.train import loop
from jaxrepro.workdir import Workdir


def shorten(config, steps: int):
    """The same config cut to ``steps`` global steps (pretrain first, then fine-tune)."""
    if steps <= 0:
        raise ConfigError(f"--steps must be > 0, got {steps}")
    config = config.copy_and_resolve_references()
    data = loop.load_data(config)
    pre = loop.phase_steps(config, "pretrain", len(data.source_train))
    with config.unlocked():
        config.pretrain.epochs = None
        config.finetune.epochs = None
        config.pretrain.steps = min(steps, pre)
        config.finetune.steps = max(0, steps - pre)
        config.checkpoint.every = max(1, steps // 4)
    return config


def _final_manifest(path: str) -> dict:
    ckpts = Checkpoints(os.path.join(path, "checkpoints"), read_only=True)
    try:
        return ckpts.meta(ckpts.latest_step())["manifest"]
    finally:
        ckpts.close()


def _versus(a: str, b: str) -> dict:
    rows = compare(Workdir(a).metrics(), Workdir(b).metrics(), start=0)
    ma, mb = _final_manifest(a), _final_manifest(b)
    leaves = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
    ia, ib = Workdir(a).read_run(), Workdir(b).read_run()
    return {
        "metrics_bitwise_equal": rows["bitwise_equal"],
        "first_difference": rows["first_difference"],
        "state_bitwise_equal": not leaves and ia["final_state_hash"] == ib["final_state_hash"],
        "differing_leaves": leaves[:20],
        "differing_leaf_count": len(leaves),
    }


def audit(config, steps: int, out: str | None = None) -> dict:
    """Runs the audit in a scratch dir; writes ``audit.json`` into ``out`` if given."""
    config = shorten(config, steps)
    scratch = tempfile.mkdtemp(prefix="jaxrepro-audit-")
    try:
        a, b, c = (os.path.join(scratch, n) for n in ("straight1", "straight2", "resumed"))
        loop.run(config, a)
        loop.run(config, b)
        loop.run(config, c, stop_after=max(1, steps // 2))
        loop.run(config, c)
        report = {
            "steps": steps,
            "platform": Workdir(a).read_run()["platform"],
            "repeat": _versus(a, b),
            "kill_and_resume": _versus(a, c),
        }
        report["ok"] = all(
            r["metrics_bitwise_equal"] and r["state_bitwise_equal"]
            for r in (report["repeat"], report["kill_and_resume"])
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if out:
        os.makedirs(out, exist_ok=True)
        jsonio.write_json(os.path.join(out, "audit.json"), report)
    return report
