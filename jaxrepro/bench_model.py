"""Micro-benchmark of one jitted forward+backward pass of a ResNet.

Times ``value_and_grad`` of a softmax cross-entropy in train mode (BatchNorm on batch
statistics, running statistics returned), which is what a training step spends
apart from the optimizer update. Parameters are filled from numpy rather than drawn
by ``model.init`` (timing does not depend on their values, and compiling the
initialiser of a ResNet-50 costs more than the measurement itself on CPU).

    python -m jaxrepro.bench_model --model resnet50 --conv_impl lax matmul --iters 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrepro import models, rng


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
    model = models.build(name, num_classes, **build_kwargs)
    variables = synthetic_variables(model, image_size)
    r = np.random.default_rng(1)
    images = jnp.asarray(r.standard_normal((batch, image_size, image_size, 3)), jnp.float32)
    labels = jnp.asarray(r.integers(0, num_classes, batch), jnp.int32)
    step = make_grad_step(model)
    start = time.perf_counter()
    jax.block_until_ready(step(variables, images, labels))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(step(variables, images, labels))
        times.append(time.perf_counter() - start)
    return {
        "model": name, "image_size": image_size, "batch": batch, **build_kwargs,
        "compile_s": compile_s, "step_s": times, "median_step_s": statistics.median(times),
        "images_per_s": batch / statistics.median(times),
    }  # fmt: skip


def main(argv=None) -> None:
    """Times the requested variants one after the other and prints JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", choices=models.MODEL_NAMES)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--stem", default="imagenet", choices=models.STEMS)
    p.add_argument("--conv_impl", nargs="+", default=["lax"], choices=models.CONV_IMPLS)
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
