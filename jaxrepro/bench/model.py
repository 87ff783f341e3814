"""Micro-benchmark of one jitted forward+backward pass of a ResNet.

Times ``value_and_grad`` of a softmax cross-entropy in train mode (BatchNorm on batch
statistics, running statistics returned), which is what a training step spends
apart from the optimizer update. Parameters are filled from numpy rather than drawn
by ``model.init`` (timing does not depend on their values, and compiling the
initialiser of a ResNet-50 costs more than the measurement itself on CPU).

    python -m jaxrepro.bench.model --model resnet50 --conv_impl lax matmul --iters 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrepro import models, rng
from jaxrepro.models import layers

# Earlier forms of the 'matmul' convolution, kept to measure against: before its
# hand-written backward ('matmul-autodiff'), and before row blocking ('matmul-whole').
BEFORE_IMPLS = ("matmul-autodiff", "matmul-whole")


def conv_matmul_autodiff(x, kernel, stride: int, padding: int, chunk: int = 0):
    """im2col over all kh*kw taps + einsum, differentiated by JAX (the old 'matmul')."""
    if chunk:
        raise ValueError("the old 'matmul' convolution has no portable (chunked) form")
    kh, kw, cin, cout = kernel.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    n, h, w, _ = x.shape
    out_h, out_w = (h - kh) // stride + 1, (w - kw) // stride + 1
    cols = []
    for di in range(kh):
        for dj in range(kw):
            limit = (n, di + stride * (out_h - 1) + 1, dj + stride * (out_w - 1) + 1, cin)
            cols.append(lax.slice(x, (0, di, dj, 0), limit, (1, stride, stride, 1)))
    cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return jnp.einsum("nhwk,ko->nhwo", cols, kernel.reshape(kh * kw * cin, cout))


@contextlib.contextmanager
def conv_impl_override(conv_impl: str):
    """While tracing: 'matmul-autodiff' swaps the old convolution in for 'matmul';
    'matmul-whole' is 'matmul' with row blocking off (every patch matrix whole).

    Yields the impl name ``models.build`` accepts.
    """
    if conv_impl not in BEFORE_IMPLS:
        yield conv_impl
        return
    from jaxrepro.models import conv as conv_lib

    new, above = layers.conv_matmul, conv_lib.BLOCK_ABOVE
    if conv_impl == "matmul-autodiff":
        layers.conv_matmul = conv_matmul_autodiff
    else:
        conv_lib.BLOCK_ABOVE = 0
    try:
        yield "matmul"
    finally:
        layers.conv_matmul, conv_lib.BLOCK_ABOVE = new, above


# Train-step tails: the project's step.py, the same (``cond``: the guarded update step.py
# uses), and step.py without the update-norm metric, to measure what it costs.
TAILS = ("project", "cond", "cond-no-update-norm")


def make_train_step_for(tail: str, **static):
    """The jitted train step of ``tail`` (see ``TAILS``), state donated like step.py's."""
    from jaxrepro.train.step import make_train_step

    if tail not in TAILS:
        raise ValueError(f"unknown train-step tail {tail!r}; valid: {', '.join(TAILS)}")
    return make_train_step(**static, update_norm=tail != "cond-no-update-norm")


def synthetic_variables(model, image_size: int, seed: int = 0) -> dict:
    """Variables with the model's tree and shapes, filled with small numpy values."""
    x = jnp.zeros((1, image_size, image_size, 3))
    shapes = jax.eval_shape(lambda k: model.init(k, x), rng.factor_root("init", seed))
    r = np.random.default_rng(seed)

    def leaf(path, s):
        if path[-1].key == "var":  # running variances must stay positive
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(r.normal(0.0, 0.05, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def make_grad_step(model):
    """A jitted ``(variables, images, labels) -> (loss, grads, batch_stats)``."""

    def loss_fn(params, batch_stats, images, labels):
        logits, upd = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images, train=True, mutable=["batch_stats"],
        )  # fmt: skip
        logp = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
        return loss, upd["batch_stats"]

    @jax.jit
    def step(variables, images, labels):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, stats), grads = grad_fn(
            variables["params"], variables["batch_stats"], images, labels
        )
        return loss, grads, stats

    return step


def time_grad_step(
    name: str = "resnet50",
    *,
    image_size: int = 32,
    batch: int = 32,
    iters: int = 5,
    num_classes: int = 10,
    **build_kwargs,
) -> dict:
    """Compile time and per-step wall times (seconds) of one forward+backward.

    Args:
      name: model name (``models.MODEL_NAMES``).
      image_size: square input side.
      batch: images per step.
      iters: timed steps after the compiling one.
      num_classes: classifier outputs.
      **build_kwargs: passed to ``models.build`` (conv_impl, bn_impl, stem, ...).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    conv_impl = build_kwargs.pop("conv_impl", "lax")
    with conv_impl_override(conv_impl) as impl:
        model = models.build(name, num_classes, conv_impl=impl, **build_kwargs)
    variables = synthetic_variables(model, image_size)
    r = np.random.default_rng(1)
    images = jnp.asarray(r.standard_normal((batch, image_size, image_size, 3)), jnp.float32)
    labels = jnp.asarray(r.integers(0, num_classes, batch), jnp.int32)
    step = make_grad_step(model)
    start = time.perf_counter()
    with conv_impl_override(conv_impl):  # traced by the first call
        jax.block_until_ready(step(variables, images, labels))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(step(variables, images, labels))
        times.append(time.perf_counter() - start)
    return {
        "model": name, "image_size": image_size, "batch": batch, "conv_impl": conv_impl,
        **build_kwargs,
        "compile_s": compile_s, "step_s": times, "median_step_s": statistics.median(times),
        "images_per_s": batch / statistics.median(times),
    }  # fmt: skip


def matmul_peak(n: int = 2048, repeats: int = 5, cores: int | None = None) -> dict:
    """Best fp32 GFLOP/s of an n x n x n matmul in numpy (BLAS) and in jax (XLA:CPU).

    Two estimates each: from the best wall time, and per core from the best process CPU
    time (work done, so other processes' load does not lower it). ``peak_gflops`` is the
    largest of the wall rates and ``cores`` x the best per-core CPU-time rate.
    """
    r = np.random.default_rng(0)
    a = r.standard_normal((n, n), dtype=np.float32)
    b = r.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3

    def best(fn):
        fn()  # warm-up (and compile)
        walls, cpus = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - start_cpu)
        return flops / min(walls) / 1e9, flops / max(min(cpus), 1e-9) / 1e9

    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    out = {"n": n, "cores": cores or len(os.sched_getaffinity(0))}
    out["numpy_gflops"], out["numpy_gflops_per_core_cpu"] = best(lambda: a @ b)
    out["jax_gflops"], out["jax_gflops_per_core_cpu"] = best(
        lambda: dot(ja, jb).block_until_ready()
    )
    per_core = max(out["numpy_gflops_per_core_cpu"], out["jax_gflops_per_core_cpu"])
    out["peak_gflops"] = max(out["numpy_gflops"], out["jax_gflops"], per_core * out["cores"])
    return out


def model_flops(arch: str, image_size: int, num_classes: int = 10) -> dict:
    """Forward and training FLOPs per image (2 x MACs of convs and dense layers).

    Counted from the jaxpr of the model built with ``lax`` convolutions at batch 1, so
    implementation details (im2col zeros, skipped padding taps) never change the count.
    """
    model = models.build(arch, num_classes, conv_impl="lax")
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda k: model.init(k, x), rng.factor_root("init", 0))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
    forward = _jaxpr_flops(jaxpr.jaxpr)
    return {"forward": forward, "train": 3 * forward}


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        for sub in _subjaxprs(eqn):
            total += _jaxpr_flops(sub)
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars)
            out = eqn.outvars[0].aval
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
            k_in = rhs.shape[spec[1]] * math.prod(rhs.shape[d] for d in spec[2:])
            total += 2 * math.prod(out.shape) * k_in
        elif name == "dot_general":
            lhs = eqn.invars[0].aval
            (contract, _), _ = eqn.params["dimension_numbers"]
            out = eqn.outvars[0].aval
            total += 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
    return total


def _subjaxprs(eqn):
    for value in eqn.params.values():
        if isinstance(value, jax.extend.core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jax.extend.core.Jaxpr):
            yield value


def main(argv=None) -> None:
    """Times the requested variants one after the other and prints JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", choices=models.MODEL_NAMES)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--stem", default="imagenet", choices=models.STEMS)
    p.add_argument(
        "--conv_impl", nargs="+", default=["lax"], choices=models.CONV_IMPLS + BEFORE_IMPLS
    )
    p.add_argument("--bn_impl", nargs="+", default=["flax"], choices=models.BN_IMPLS)
    args = p.parse_args(argv)
    for conv_impl in args.conv_impl:
        for bn_impl in args.bn_impl:
            result = time_grad_step(
                args.model, image_size=args.image_size, batch=args.batch, iters=args.iters,
                stem=args.stem, conv_impl=conv_impl, bn_impl=bn_impl,
            )  # fmt: skip
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
