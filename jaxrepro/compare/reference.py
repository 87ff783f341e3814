"""The PyTorch reference trainer: the same run as ``jaxrepro train``, in PyTorch.

Everything random or data-dependent comes from the JAX engine, so a difference between
the two trajectories is the frameworks' numerics, not a seed:

* the model is ``torch_resnet.build`` of the configured arch, loaded with the JAX run's
  initial variables (``Runner.init_state``, ported with ``flax_to_torch``);
* every batch is the engine's: the same example ids from the data order, the same pixels
  from the JAX augmentation and normalisation (computed here, NHWC -> NCHW);
* the optimizer is torch's AdamW, which is optax's ``scale_by_adam`` ->
  ``add_decayed_weights`` -> ``scale_by_learning_rate`` (decoupled weight decay, eps
  outside the square root, bias correction) with the lr set every step from the very
  schedule function of the phase; global-norm clipping as optax does it;
* at the fine-tune boundary the head is the engine's new head (``state_lib.new_head``,
  ported) and Adam starts afresh; the backbone gets the lr multiplier or is frozen;
* BatchNorm: torch's momentum 0.1 is Flax's 0.9, running variance unbiased in both;
* evaluation on the same splits at the same steps, with the engine's preprocessing.

It writes a workdir in jaxrepro's layout (config.json, run.json with
``"framework": "pytorch"``, metrics.jsonl with the engine's row schema, dropoffs.json)
plus ``weights/final.pt``, the final ``state_dict``, so every jaxrepro tool reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F

from jaxrepro import config as config_lib
from jaxrepro import dropoff as dropoff_lib
from jaxrepro import machine, rng
from jaxrepro.compare import torch_port, torch_resnet
from jaxrepro.data import augment as augment_lib
from jaxrepro.errors import ConfigError, JaxreproError, WorkdirError
from jaxrepro.plumbing import hashing
from jaxrepro.train import runinfo
from jaxrepro.train import state as state_lib
from jaxrepro.train.evaluation import eval_row
from jaxrepro.train.optimizer import HEAD
from jaxrepro.train.record import train_row
from jaxrepro.train.setup import RunSetup
from jaxrepro.train.step import normalize
from jaxrepro.workdir import MetricsWriter, Workdir

log = logging.getLogger("jaxrepro")

FRAMEWORK = "pytorch"
WEIGHTS_FILE = os.path.join("weights", "final.pt")


@contextlib.contextmanager
def torch_determinism(threads: int):
    """Deterministic kernels and a fixed thread count for the run, restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def make_input_fns(config):
    """jitted (train, eval) preprocessing of the JAX engine: augment, scale, normalise."""
    cfg = config.data.augment
    mean, std = tuple(config.data.normalize.mean), tuple(config.data.normalize.std)

    def train_inputs(aug_root, images, epochs, ids):
        return normalize(augment_lib.augment_batch(aug_root, images, epochs, ids, cfg), mean, std)

    def eval_inputs(images):
        return normalize(augment_lib.eval_preprocess(images), mean, std)

    return jax.jit(train_inputs), jax.jit(eval_inputs)


def to_nchw(x_nhwc) -> torch.Tensor:
    """A JAX/NumPy NHWC batch as a contiguous float32 NCHW torch tensor."""
    return torch.from_numpy(
        np.ascontiguousarray(np.asarray(x_nhwc, np.float32).transpose(0, 3, 1, 2))
    )


def build_model(config, variables) -> torch_resnet.ResNet:
    """The torch ResNet of the config, holding exactly ``variables`` (Flax layout)."""
    arch = config.model.name
    state_dict = torch_port.flax_to_torch(variables, arch)
    num_classes = int(state_dict["fc.bias"].shape[0])
    model = torch_resnet.build(arch, num_classes, width=config.model.width, stem=config.model.stem)
    model.load_state_dict(state_dict, strict=True)
    return model


def port_head(model: torch_resnet.ResNet, head: dict) -> None:
    """Replaces ``model.fc`` by the Flax head ``{'kernel': (in, out), 'bias': (out,)}``."""
    kernel, bias = np.asarray(head["kernel"], np.float32), np.asarray(head["bias"], np.float32)
    fc = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
        fc.bias.copy_(torch.from_numpy(bias.copy()))
    model.fc = fc


def make_optimizer(config, model, phase_name: str) -> torch.optim.Optimizer:
    """AdamW over the param groups of a phase (see ``param_groups``)."""
    opt = config.optimizer
    return torch.optim.AdamW(
        param_groups(config, model, phase_name),
        lr=0.0,  # set every step from the schedule
        betas=(float(opt.b1), float(opt.b2)),
        eps=float(opt.eps),
        weight_decay=float(opt.weight_decay),
        foreach=False,
    )


def param_groups(config, model, phase_name: str) -> list[dict]:
    """Groups with an ``lr_mult``: all params (x1), or head (x1) and backbone (x mult).

    A frozen backbone is left out of the optimizer (optax ``set_to_zero``: no update, no
    decay), but keeps its gradients, which count in grad_norm and clipping as in optax.
    """
    ft = config.finetune
    head = [p for n, p in model.named_parameters() if n.split(".")[0] == HEAD]
    backbone = [p for n, p in model.named_parameters() if n.split(".")[0] != HEAD]
    if phase_name != "finetune" or (not ft.freeze_backbone and ft.backbone_lr_mult == 1.0):
        return [{"params": head + backbone, "lr_mult": 1.0}]
    groups = [{"params": head, "lr_mult": 1.0}]
    if not ft.freeze_backbone:
        groups.append({"params": backbone, "lr_mult": float(ft.backbone_lr_mult)})
    return groups


def global_norm(tensors) -> float:
    """The L2 norm of a list of tensors taken together (optax ``tree.norm``)."""
    return float(torch.sqrt(sum(torch.sum(t * t) for t in tensors)))


class TorchTrainer:
    """The torch side of one run: model, optimizer, and the engine it mirrors."""

    def __init__(self, config, runner: RunSetup):
        self.config = config
        self.runner = runner
        self.train_inputs, self.eval_inputs = make_input_fns(config)
        state = runner.init_state()
        self.init_variables = {"params": state.params, "batch_stats": state.batch_stats}
        self.model = build_model(config, self.init_variables)
        self.phase = None
        self.optimizer = None
        self.applied = 0  # updates applied in this phase: optax's schedule count
        self.halted = False  # policy 'stop' after a non-finite step: no more updates

    def start_phase(self, phase) -> None:
        """Fresh Adam for ``phase``; at the fine-tune boundary also the engine's new head."""
        if self.phase is not None and phase.name == "finetune":
            old_classes = int(self.model.fc.bias.shape[0])
            if self.config.finetune.new_head or old_classes != phase.num_classes:
                seeds = self.runner.seeds
                head = state_lib.new_head(self.config, seeds, {}, phase.num_classes)[HEAD]
                port_head(self.model, head)
        self.phase = phase
        self.optimizer = make_optimizer(self.config, self.model, phase.name)
        self.applied = 0

    def inputs(self, phase, batch) -> tuple[torch.Tensor, torch.Tensor]:
        aug_root, _ = self.runner.keys(phase)
        x = self.train_inputs(aug_root, batch["image"], batch["epoch"], batch["id"])
        return to_nchw(jax.device_get(x)), torch.from_numpy(batch["label"].astype(np.int64))

    def step(self, phase, batch, step: int) -> dict:
        """One optimizer step on the engine's batch; returns the train-row metrics."""
        x, y = self.inputs(phase, batch)
        params = list(self.model.parameters())
        before = [p.detach().clone() for p in params]
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        grads = [p.grad for p in params]
        grad_norm = global_norm(grads)
        finite = bool(torch.isfinite(loss)) and np.isfinite(grad_norm)
        apply = finite and not self.halted
        if apply:
            self._update(grads, grad_norm)
        else:  # the engine keeps params, Adam and BN statistics of the last good state
            self.model.load_state_dict(buffers, strict=False)
        with torch.no_grad():
            update_norm = global_norm([p - b for p, b in zip(params, before, strict=True)])
            param_norm = global_norm(params)
        return {
            "loss": loss.item(),
            "accuracy": float((logits.argmax(-1) == y).float().mean()),
            "grad_norm": grad_norm,
            "update_norm": update_norm if apply else 0.0,
            "param_norm": param_norm,
            "lr": float(phase.lr_fn(step - phase.start)),
            "finite": finite,
            "applied": apply,
        }

    def _update(self, grads, grad_norm: float) -> None:
        clip = self.config.optimizer.clip_norm
        if clip and not grad_norm < clip:  # optax: g / norm * max_norm when norm >= max
            with torch.no_grad():
                for g in grads:
                    g.div_(grad_norm).mul_(float(clip))
        lr = float(self.phase.lr_fn(self.applied))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        self.optimizer.step()
        self.applied += 1

    @torch.no_grad()
    def evaluate(self, phase, step: int) -> list[dict]:
        """Eval rows of the engine's splits for ``phase`` (its eval batches, no augmentation)."""
        self.model.eval()
        bs = self.config.train.eval_batch_size
        rows = []
        for split, src in self.runner.eval_sets(phase):
            n, loss_sum, correct = len(src), 0.0, 0.0
            for i in range(0, n, bs):
                images, labels = src.get(np.arange(i, min(i + bs, n)))
                logits = self.model(to_nchw(jax.device_get(self.eval_inputs(images))))
                y = torch.from_numpy(np.asarray(labels, np.int64))
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += float((logits.argmax(-1) == y).float().sum())
            rows.append(eval_row(phase, step, split, loss_sum, correct, n))
        return rows

    def flax_variables(self) -> dict:
        """The model's current weights in Flax layout (for hashes and distances)."""
        return torch_port.torch_to_flax(self.model.state_dict(), self.config.model.name)


def _due(every: int, phase_step: int) -> bool:
    return phase_step == 0 or (every > 0 and phase_step % every == 0)


def _logged(phase, step) -> bool:
    return (step - phase.start) % phase.log_every == 0 or step == phase.end - 1


def _claim(ws: Workdir, config) -> dict | None:
    """Claims the workdir; returns the finished run's info when there is nothing to do."""
    resuming = ws.claim(config_lib.to_dict(config))
    info = ws.read_run()
    if resuming and info.get("framework") != FRAMEWORK:
        raise WorkdirError(
            f"workdir {ws.path} holds a jaxrepro (JAX) run of this config; give the "
            "PyTorch reference a workdir of its own"
        )
    if resuming and info.get("status") in ("done", "diverged"):
        return info
    return None  # fresh, or unfinished: the reference keeps no checkpoints, so start over


def _loop(trainer: TorchTrainer, runner, metrics: MetricsWriter) -> tuple[str, int]:
    """The engine's schedule of evals, phase switches and steps; returns (status, step)."""
    first = next(p for p in runner.phases if p.steps > 0)
    trainer.start_phase(first)
    current, s = first, 0
    stop = trainer.config.train.nonfinite_policy == "stop"
    halted_at = None
    while s < runner.total:
        # Under 'stop' the engine's record ends at the first non-finite step: its row,
        # then status 'diverged' at the next step (no eval, no further rows): so ours.
        if halted_at is not None:
            return "diverged", s
        phase = runner.phase_of(s)
        if phase.name != current.name:  # old phase's final eval, then new head + Adam
            _write(metrics, trainer.evaluate(current, s))
            trainer.start_phase(phase)
            current = phase
        if _due(phase.eval_every, s - phase.start):
            _write(metrics, trainer.evaluate(phase, s))
        batch = runner.batch(phase, s)
        m = trainer.step(phase, batch, s)
        halts = stop and not m["finite"] and halted_at is None
        if _logged(phase, s) or halts:  # the engine writes a stop's row whatever log_every
            _write(metrics, [train_row(phase, s, batch["epoch"][0], m)])
        if halts:
            halted_at, trainer.halted = s, True
        s += 1
    if trainer.halted:
        return "diverged", s
    _write(metrics, trainer.evaluate(current, s))
    return "done", s


def _write(metrics: MetricsWriter, rows) -> None:
    for row in rows:
        metrics.write(row)


def _check_config(config) -> None:
    if config.model.dtype != "float32":
        raise ConfigError(
            f"config field model.dtype: the PyTorch reference trains in float32 only, got "
            f"{config.model.dtype!r} (compare a float32 JAX run)"
        )
    if config.model.dropout_rate > 0:
        # The torch ResNet has no dropout, and its masks would not be the engine's draws.
        raise ConfigError(
            f"config field model.dropout_rate: the PyTorch reference does not support "
            f"dropout, got {config.model.dropout_rate} (compare a run with "
            "model.dropout_rate=0)"
        )


def _run_info(config, runner, trainer, threads) -> dict:
    return {
        "framework": FRAMEWORK,
        "status": "running",
        "seeds": runner.seeds,
        "torch": {
            "version": torch.__version__,
            "threads": threads,
            "deterministic_algorithms": True,
            "optimizer": "torch.optim.AdamW (decoupled weight decay)",
        },
        "platform": runinfo.platform_info(),
        "libraries": runinfo.library_versions(),
        "code": runinfo.code_version(),
        "phases": {
            p.name: {
                "start": p.start,
                "steps": p.steps,
                "batch_size": p.batch_size,
                "num_classes": p.num_classes,
            }
            for p in runner.phases
        },
        "total_steps": runner.total,
        "init_param_hash": hashing.tree_hash(trainer.init_variables["params"]),
        "started": time.time(),
    }


def run(config, workdir: str) -> dict:
    """Trains the PyTorch reference of ``config`` in ``workdir``; returns run.json's content.

    Raises:
      ConfigError: for an invalid config, or one the reference cannot mirror (not float32,
        or with dropout).
      WorkdirError: if ``workdir`` holds another config or a JAX run.
    """
    rng.configure()
    config_lib.validate(config)
    _check_config(config)
    ws = Workdir(workdir)
    done = _claim(ws, config)
    if done is not None:
        log.info("%s: reference run already done; nothing to do", ws.path)
        return done
    threads = machine.cpu_threads()
    t0 = time.perf_counter()
    with torch_determinism(threads):
        # The engine's run setup: its data, phases, keys and initial state.
        runner = RunSetup(config)
        trainer = TorchTrainer(config, runner)
        info = ws.update_run(**_run_info(config, runner, trainer, threads))
        metrics = MetricsWriter(ws.metrics_path, None)
        try:
            status, step = _loop(trainer, runner, metrics)
        finally:
            metrics.close()
        weights = ws.file(WEIGHTS_FILE)
        os.makedirs(os.path.dirname(weights), exist_ok=True)
        torch.save(trainer.model.state_dict(), weights)
        final = trainer.flax_variables()
    rows = ws.metrics()
    events = dropoff_lib.detect(rows, config.dropoff)
    dropoff_lib.write_dropoffs(ws.path, events)
    info.update(
        status=status,
        step=step,
        weights=WEIGHTS_FILE,
        final_param_hash=hashing.tree_hash(final["params"]),
        nonfinite_steps=sum(1 for r in rows if r.get("skipped")),
        dropoff_count=len(events),
        wall_time_s=round(time.perf_counter() - t0, 3),
    )
    ws.update_run(**info)
    log.info("%s: PyTorch reference %s at step %d", ws.path, status, step)
    return info


def main_from_flags(flags, config) -> int:
    """``jaxrepro torch_train --config=... --workdir=DIR``: train, print a summary line."""
    if not flags.workdir:
        raise JaxreproError("--workdir is required")
    info = run(config, flags.workdir)
    print(
        f"{info['status']}: PyTorch reference ({info['torch']['version']}) in "
        f"{flags.workdir}; final weights {os.path.join(flags.workdir, WEIGHTS_FILE)}"
    )
    return 0 if info["status"] == "done" else 1
