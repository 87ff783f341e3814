r"""``jaxrepro bench data``: the host input pipeline on ImageNet-like JPEGs.

    jaxrepro bench data [image_size=224 batch=32 steps=16 workers=1,2 train_steps=10]

The dataset is ``photos`` (jaxrepro/data/photos.py): 512 JPEGs of 375-427 x 450-560
pixels, ~100 KB each, generated from the two real photographs scikit-learn ships, stored
as TFDS array_record (built once into ``data_dir``, default ``~/.cache/jaxrepro/tfds``).

Measured (``data.json``):

* ``decode``: for each worker count, the pipeline (jaxrepro/data/pipeline.py, a queue of
  one batch per worker) reads, decodes and resizes (to ``image_size``) ``steps`` batches
  while this process only takes them. CPU seconds per image are the workers' own thread
  CPU time around each batch's decoding, so they hold on a shared machine; images/s is the
  wall time from the first batch (which includes starting the workers) to the last, so it
  depends on the load (and counts the <= 3 batches per worker buffered meanwhile).
* ``augment``: the on-device augmentation of the ImageNet config (crop with padding 16,
  flip, brightness, contrast), jitted, on this CPU, on decoded batches: CPU s per image.
* ``per_core``: decoded-and-augmented images per CPU-second, ``1 / (decode + augment)``
  CPU seconds per image (augmentation runs on the accelerator in training; on a CPU-only
  host it would cost this much).
* ``train``: a training run of ResNet-50 at ``image_size`` on ``photos`` on this machine
  with one data worker (``configs/imagenet.py`` with the photos for source and target): the
  fraction of steps whose batch was not decoded yet when the loop asked for it, and the
  time waited (run.json ``data_wait``), and the images per second the run consumed.
* the machine's load average before and after.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

DATA_DEFAULTS = {
    "image_size": 224,
    "batch": 32,
    "steps": 40,  # batches decoded per worker count (the 512 train images, 2.5 times)
    "workers": "1,2",
    "train_steps": 10,
    "train_batch": 8,
    "data_dir": "",  # '': ~/.cache/jaxrepro/tfds
}


def _decode(reader, opts: dict, workers: int) -> dict:
    from jaxrepro import rng
    from jaxrepro.data import order, pipeline

    batch, steps = opts["batch"], opts["steps"]
    plan = pipeline.Plan(
        order.host_key(rng.factor_root("data", 0)),
        "stream",
        (pipeline.Segment("pretrain", 0, steps, batch, reader),),
    )
    prefetcher = pipeline.Prefetcher(plan, np.arange(steps), workers=workers, prefetch=1)
    try:
        t0 = time.perf_counter()
        cpu = float(prefetcher.get(0)["decode_cpu_s"])
        start = time.perf_counter()
        for step in range(1, steps):
            cpu += float(prefetcher.get(step)["decode_cpu_s"])
        wall = time.perf_counter() - start
    finally:
        prefetcher.close()
    images = (steps - 1) * batch
    return {
        "workers": workers,
        "first_batch_s": round(start - t0, 3),
        "images_per_s": round(images / wall, 1),
        "images_per_s_per_worker": round(images / wall / workers, 1),
        "worker_cpu_s_per_image": round(cpu / (steps * batch), 5),
    }


def _augment(reader, opts: dict) -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    from jaxrepro import config as config_lib
    from jaxrepro import rng
    from jaxrepro.data import augment

    cfg = config_lib.load_config_file("configs/imagenet.py").data.augment
    images, _, _ = reader.read(np.arange(opts["batch"]))
    images = jnp.asarray(images)
    ids = jnp.arange(opts["batch"])
    epochs = jnp.zeros(opts["batch"], jnp.int32)
    fn = jax.jit(functools.partial(augment.augment_batch, cfg=cfg))
    root = rng.phase_root(rng.factor_root("aug", 0), "pretrain")
    fn(root, images, epochs, ids).block_until_ready()
    rounds = 8
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        fn(root, images, epochs, ids).block_until_ready()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    n = rounds * opts["batch"]
    return {
        "ops": "crop (padding 16), flip, brightness, contrast (configs/imagenet.py)",
        "images_per_s": round(n / wall, 1),
        "cpu_s_per_image": round(cpu / n, 5),
    }


def _train(data_dir: str, opts: dict) -> dict:
    from jaxrepro import config as config_lib
    from jaxrepro.train import loop

    c = config_lib.load_config_file("configs/imagenet.py")
    for role in (c.data.source, c.data.target):
        role.name, role.train_split, role.eval_split = "photos", "train", "test"
    c.data.data_dir = data_dir
    c.data.image_size = opts["image_size"]
    c.pretrain.epochs = None
    c.pretrain.steps = opts["train_steps"]
    c.pretrain.batch_size = opts["train_batch"]
    c.pretrain.eval_every = 0
    c.finetune.steps = 0
    c.checkpoint.every = 0
    c.train.eval_batch_size = 64
    c.runtime.data_workers = 1
    c.runtime.max_in_memory_mb = 0  # read as a split too large for memory is
    c.runtime.progress_every_s = 1e9
    with tempfile.TemporaryDirectory() as workdir:
        info = loop.run(c, os.path.join(workdir, "run"))
    steps = info["data_wait"]["steps"] + 1
    return {
        "config": "configs/imagenet.py, source and target photos, ResNet-50, "
        f"{opts['image_size']}x{opts['image_size']}, batch {opts['train_batch']}, 1 worker",
        "steps": steps,
        "data_wait": info["data_wait"],
        "compile_s": info["compile_time_s"],
        "wall_s": info["wall_time_s"],
        "images_per_s_needed": round(steps * opts["train_batch"] / info["wall_time_s"], 2),
    }


def bench_data(opts: dict) -> dict:
    from jaxrepro.bench import common as bench
    from jaxrepro.data import photos, sources

    workers = bench.int_list(opts["workers"], "workers")
    data_dir = opts["data_dir"] or os.path.expanduser("~/.cache/jaxrepro/tfds")
    load_before = [round(x, 2) for x in os.getloadavg()]
    src = sources.load(
        "photos",
        "train",
        data_dir=data_dir,
        image_size=opts["image_size"],
        max_in_memory_bytes=0,
    )
    recipe = (photos.Photos.HEIGHTS, photos.Photos.WIDTHS, photos.Photos.DOWNSCALE)
    sizes = [len(photos.make_example(0, i, *recipe)[0]) for i in range(16)]
    decode = [_decode(src.reader, opts, w) for w in workers]
    augment = _augment(src.reader, opts)
    cpu_per_image = float(np.median([d["worker_cpu_s_per_image"] for d in decode]))
    per_core = 1.0 / (cpu_per_image + augment["cpu_s_per_image"])
    train = _train(data_dir, opts)
    return {
        "kind": "data",
        "options": opts,
        "machine": bench.machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "dataset": {
            "name": "photos",
            "made": "generated: random crops of the two real photos scikit-learn ships "
            "(china.jpg, flower.jpg), flipped, colour-scaled, noised, PIL JPEG quality 95; "
            "TFDS array_record (jaxrepro/data/photos.py)",
            "train_examples": len(src),
            "jpeg_kb_mean_of_16": round(float(np.mean(sizes)) / 1e3, 1),
            "decoder": sources.decoder_version(),
            "resize": f"PIL bilinear, shorter side {opts['image_size']}, centre crop",
        },
        "decode": decode,
        "augment": augment,
        "per_core": {
            "decode_cpu_s_per_image": round(cpu_per_image, 5),
            "decoded_and_augmented_images_per_core_s": round(per_core, 1),
            "decoded_images_per_core_s": round(1.0 / cpu_per_image, 1),
        },
        "train": train,
    }
