"""Divergence of two trajectories of the same batches: per step, and of final weights.

Split from ``report.py``: the numbers, not the presentation.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from jaxrepro import config as config_lib
from jaxrepro import rng, trajectory
from jaxrepro.checkpoints import Checkpoints
from jaxrepro.compare import torch_port
from jaxrepro.errors import JaxreproError
from jaxrepro.train import state as state_lib


class CompareError(JaxreproError, ValueError):
    """Inputs that cannot be compared: missing, unreadable, or with nothing in common."""


@dataclasses.dataclass
class Run:
    """One run's rows and where they came from."""

    name: str
    group: str  # 'jax' or 'pytorch': the side of the comparison it is on
    path: str
    rows: list
    config: dict | None = None  # config.json of a workdir; None for result files
    info: dict = dataclasses.field(default_factory=dict)  # run.json


def same_batches(a: Run, b: Run) -> bool:
    """Both are workdirs of one config (so of the same batches and initial weights)."""
    if a.config is None or b.config is None:
        return False
    return not config_lib.diff(a.config, b.config)


def _paired(jax_rows, torch_rows, kind) -> list[tuple[dict, dict]]:
    """The rows of one kind both runs logged (``trajectory.pairs``), by step."""
    mine = [r for r in jax_rows if r.get("kind") == kind]
    return sorted(trajectory.pairs(mine, torch_rows), key=lambda p: p[0]["step"])


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def trajectory_divergence(jax_rows, torch_rows) -> dict:
    """Per-step differences (PyTorch - JAX) of two runs of the same batches.

    Returns:
      ``{"train": {"per_step": [...], "first": {...}, "max_loss_abs_diff",
      "max_loss_rel_diff", "max_grad_norm_rel_diff", "n"}, "eval": {...}}``.
    """
    per_step = []
    for j, t in _paired(jax_rows, torch_rows, "train"):
        per_step.append(
            {
                "phase": j.get("phase"),
                "step": j["step"],
                "loss_jax": j["loss"],
                "loss_torch": t["loss"],
                "loss_abs_diff": abs(t["loss"] - j["loss"]),
                "loss_rel_diff": _rel(j["loss"], t["loss"]),
                "grad_norm_rel_diff": _rel(j["grad_norm"], t["grad_norm"]),
            }
        )
    if not per_step:
        raise CompareError("the two runs share no logged training step")
    evals = [
        {
            "phase": j.get("phase"),
            "step": j["step"],
            "split": j.get("split"),
            "loss_rel_diff": _rel(j["loss"], t["loss"]),
            "accuracy_abs_diff": abs(j["accuracy"] - t["accuracy"]),
        }
        for j, t in sorted(
            _paired(jax_rows, torch_rows, "eval"),
            key=lambda p: (p[0]["step"], p[0].get("phase") or "", p[0].get("split") or ""),
        )
    ]
    return {
        "train": {
            "n": len(per_step),
            "first": per_step[0],
            "max_loss_abs_diff": max(p["loss_abs_diff"] for p in per_step),
            "max_loss_rel_diff": max(p["loss_rel_diff"] for p in per_step),
            "max_grad_norm_rel_diff": max(p["grad_norm_rel_diff"] for p in per_step),
            "per_step": per_step,
        },
        "eval": {
            "n": len(evals),
            "max_loss_rel_diff": max((e["loss_rel_diff"] for e in evals), default=math.nan),
            "max_accuracy_abs_diff": max((e["accuracy_abs_diff"] for e in evals), default=math.nan),
            "per_eval": evals,
        },
    }


def _restore_target(run: Run, phase_name: str):
    """The abstract TrainState of a run's phase (what the engine restores into)."""
    config = config_lib.from_dict(run.config)
    p = run.info["phases"][phase_name]
    conv_impl = run.info.get("conv_impl", "lax")  # shapes do not depend on it
    phase = state_lib.make_phase(
        config, phase_name, p["start"], p["steps"], p["num_classes"], conv_impl
    )

    def init():
        key = rng.factor_root("init", 0)  # any key: only shapes are used
        params, stats_ = state_lib.init_variables(phase.module, key, config.data.image_size)
        return state_lib.initial_state(phase, params, stats_)

    return jax.eval_shape(init)


def jax_final_variables(run: Run) -> tuple[int, dict]:
    """(step, {'params', 'batch_stats'}) of a JAX run's latest checkpoint.

    Raises:
      CompareError: if the run has no readable checkpoint.
    """
    ckpt_dir = os.path.join(run.path, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise CompareError(f"{run.path}: no checkpoints/ directory")
    ckpts = Checkpoints(ckpt_dir, read_only=True)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise CompareError(f"{ckpt_dir}: no checkpoint")
        target = _restore_target(run, ckpts.meta(step)["phase"])
        state, _ = ckpts.restore(step, target, expect={"model": run.config["model"]["name"]})
    except (JaxreproError, KeyError) as e:
        raise CompareError(f"{run.path}: cannot restore the final checkpoint: {e}") from e
    finally:
        ckpts.close()
    return step, {"params": state.params, "batch_stats": state.batch_stats}


def param_distance(jax_variables, torch_state_dict, arch: str) -> dict:
    """Distance between JAX variables (ported to torch layout) and a torch state_dict.

    Returns:
      ``{"l2", "rel", "max_abs", "bn_stats_l2", "bn_stats_rel", "worst"}``: the L2 norm of
      the difference of all trainable parameters (and its ratio to the JAX norm), the
      largest elementwise difference, the same for BatchNorm running statistics, and the
      tensors with the largest relative difference.
    """
    ported = torch_port.flax_to_torch(jax_variables, arch)
    theirs = torch_port.normalize_state_dict(torch_state_dict)
    torch_port.torch_to_flax(theirs, arch)  # raises PortError listing any mismatch
    sums = {"param": [0.0, 0.0], "stat": [0.0, 0.0]}
    max_abs, worst = 0.0, []
    for key, mine in ported.items():
        if key.endswith("num_batches_tracked"):
            continue
        a = mine.numpy().astype(np.float64)
        d = theirs[key].detach().numpy().astype(np.float64) - a
        kind = "stat" if key.endswith(("running_mean", "running_var")) else "param"
        sums[kind][0] += float(np.sum(d * d))
        sums[kind][1] += float(np.sum(a * a))
        if kind == "param":
            max_abs = max(max_abs, float(np.max(np.abs(d))))
        worst.append((float(np.linalg.norm(d) / max(np.linalg.norm(a), 1e-12)), key))
    l2, norm = math.sqrt(sums["param"][0]), math.sqrt(sums["param"][1])
    bn, bn_norm = math.sqrt(sums["stat"][0]), math.sqrt(sums["stat"][1])
    return {
        "l2": l2,
        "rel": l2 / max(norm, 1e-12),
        "max_abs": max_abs,
        "bn_stats_l2": bn,
        "bn_stats_rel": bn / max(bn_norm, 1e-12),
        "worst": [{"key": k, "rel": r} for r, k in sorted(worst, reverse=True)[:5]],
    }


def final_param_distance(jax_run: Run, torch_run: Run) -> dict:
    """``param_distance`` of the two runs' final weights, or ``{"unavailable": why}``."""
    weights = torch_run.info.get("weights")
    if not weights:
        return {"unavailable": f"{torch_run.path}: run.json names no saved weights"}
    try:
        step, variables = jax_final_variables(jax_run)
        if step != torch_run.info.get("step"):
            return {
                "unavailable": f"JAX checkpoint at step {step}, reference ended at step "
                f"{torch_run.info.get('step')}"
            }
        state_dict = torch_port.load_torch_file(os.path.join(torch_run.path, weights))
        out = param_distance(variables, state_dict, jax_run.config["model"]["name"])
    except (JaxreproError, OSError) as e:
        return {"unavailable": str(e)}
    return {"step": step, **out}
