r"""Images/s of the project's real train step (ResNet, Adam, augmentation) on one device.

One process per setting, because deterministic GPU mode is XLA flags, read when the backend
starts. Prints one JSON line; ``launch/gpu_check.sh`` runs it four times (fp32/bf16 x
deterministic on/off).

    python launch/step_speed.py --dtype=bfloat16 --deterministic=1 --size=224 --batch=128
    python launch/step_speed.py --tiny          # resnet_tiny at 32x32: a CPU check in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrepro import parallel  # noqa: E402 - imports jax, starts no backend


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--deterministic", type=int, default=1, choices=(0, 1))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="resnet_tiny, 32x32, batch 8, 3 steps")
    a = p.parse_args(argv)
    if a.tiny:
        a.model, a.size, a.batch, a.warmup, a.steps = "resnet_tiny", 32, 8, 1, 3
    return a


def _config(a):
    from jaxrepro import config as config_lib

    c = config_lib.base()
    c.model.name = a.model
    c.model.dtype = a.dtype
    c.data.image_size = a.size
    c.data.augment.crop.enabled = True
    c.data.augment.flip.enabled = True
    c.pretrain.batch_size = a.batch
    c.determinism.gpu_deterministic = bool(a.deterministic)
    return c


def _setup(c, a):
    import jax
    import numpy as np

    from jaxrepro import rng
    from jaxrepro.train import setup as setup_lib
    from jaxrepro.train import state as state_lib
    from jaxrepro.train.step import make_train_step

    conv_impl = setup_lib.resolve_conv_impl(c)
    phase = state_lib.make_phase(c, "pretrain", 0, a.warmup + a.steps, 1000, conv_impl)
    params, stats = state_lib.init_variables(phase.module, rng.factor_root("init", 0), a.size)
    par = parallel.DataParallel(1)
    state = par.replicate(state_lib.initial_state(phase, params, stats))
    r = np.random.default_rng(0)
    batch = par.shard_batch(
        {
            "image": r.integers(0, 256, (a.batch, a.size, a.size, 3), dtype=np.uint8),
            "label": r.integers(0, 1000, a.batch, dtype=np.int32),
            "id": np.arange(a.batch, dtype=np.int32),
            "epoch": np.zeros(a.batch, np.int32),
        },
        a.batch,
    )
    keys = par.replicate((rng.factor_root("aug", 0), rng.factor_root("dropout", 0)))
    fn = make_train_step(
        module=phase.module,
        tx=phase.tx,
        lr_fn=phase.lr_fn,
        phase_start=0,
        augment_cfg=c.data.augment,
        mean=tuple(c.data.normalize.mean),
        std=tuple(c.data.normalize.std),
        policy="skip",
    )
    t0 = time.perf_counter()
    step = par.jit_train_step(fn).lower(state, batch, *keys).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(state)
    return step, state, batch, keys, compile_s, conv_impl


def measure(a) -> dict:
    c = _config(a)
    parallel.apply_determinism(c.determinism)  # before the backend starts
    import jax

    from jaxrepro.plumbing import hashing

    step, state, batch, keys, compile_s, conv_impl = _setup(c, a)
    for _ in range(a.warmup):
        state, m = step(state, batch, *keys)
    jax.block_until_ready((state, m))
    t0 = time.perf_counter()
    for _ in range(a.steps):
        state, m = step(state, batch, *keys)
    jax.block_until_ready((state, m))
    seconds = time.perf_counter() - t0
    return {
        "model": a.model,
        "size": a.size,
        "batch": a.batch,
        "dtype": a.dtype,
        "deterministic": bool(a.deterministic),
        "determinism": parallel.determinism_record(c.determinism),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "conv_impl": conv_impl,
        "compile_s": round(compile_s, 2),
        "steps": a.steps,
        "step_ms": round(1000 * seconds / a.steps, 3),
        "images_per_s": round(a.batch * a.steps / seconds, 2),
        "final_loss": float(m["loss"]),
        "state_hash": hashing.tree_hash(state.params)[:16],
    }


def main(argv=None) -> int:
    print(json.dumps(measure(_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
