r"""ResNet-50 on ImageNet-2012 (the usual recipe, with Adam), then fine-tuned on EuroSAT.

The target is a truly different domain: EuroSAT RGB (TFDS ``eurosat/rgb``, Helber et al.
2019), 27,000 Sentinel-2 satellite tiles of 64x64 pixels at 10 m per pixel in 10 land-use
classes (annual crop, forest, highway, river, ...). Chosen over textures (dtd) or flowers
(oxford_flowers102), which are still ground-level photographs of the kind ImageNet holds
(ImageNet has flower and texture-like classes): EuroSAT differs in viewpoint (straight
down), scale, colour statistics and label set, and it is one of the "specialized" tasks of
the Visual Task Adaptation Benchmark (Zhai et al. 2019). It downloads automatically (~90 MB)
and prepares in minutes. TFDS gives it one split; the config fine-tunes on the first 80%
of it in TFDS's stored order and evaluates on the last 20% (5,400), a fixed split.

ImageNet needs its tars in the TFDS manual dir and the `tf` extra to prepare, once
(`jaxrepro prepare` says how, and checks the data dir and the result):

    jaxrepro prepare --config=configs/imagenet.py --data_dir=/data/tfds
    python -m jaxrepro train --config=configs/imagenet.py --workdir=runs/in1k \
        --config.data.data_dir=/data/tfds

Both train splits are too large to hold decoded in memory, so `runtime.data_workers`
processes decode their JPEGs ahead of the step (README, "Host input pipeline", for how
many cores a GPU needs). To start from torchvision's ImageNet weights instead of
pretraining, port them (`jaxrepro port`), set `init_from` and `pretrain.epochs=0`.

Expected: 90 epochs at global batch 1024 (~112k steps) to ~75-76% top-1 on 8 GPUs or a TPU
slice in about a day; Adam with 5 warmup epochs and cosine decay, decoupled weight decay.
`smoke` shrinks everything (tiny model, 64x64, a few steps) for a CPU check.
"""

import os

from jaxrepro import config as config_lib


def get_config(arg=None):
    c = config_lib.base()
    c.model.name = "resnet50"
    c.model.stem = "imagenet"
    c.model.zero_init_residual = True
    c.data.source.name = "imagenet2012"
    c.data.source.eval_split = "validation"
    c.data.target.name = "eurosat/rgb"
    c.data.target.train_split = "train[:80%]"
    c.data.target.eval_split = "train[80%:]"
    c.data.image_size = 224
    c.data.normalize.mean = (0.485, 0.456, 0.406)
    c.data.normalize.std = (0.229, 0.224, 0.225)
    c.data.augment.crop.padding = 16
    c.data.augment.flip.enabled = True
    c.data.augment.brightness.enabled = True
    c.data.augment.contrast.enabled = True
    c.optimizer.lr = 2e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 6250
    c.optimizer.clip_norm = 1.0
    c.pretrain.epochs = 90
    c.pretrain.batch_size = 1024
    c.pretrain.eval_every = 5000
    c.pretrain.log_every = 50
    c.finetune.steps = 3000
    c.finetune.batch_size = 256
    c.finetune.lr = 1e-4
    c.finetune.backbone_lr_mult = 0.1
    c.finetune.eval_every = 300
    c.finetune.log_every = 10
    c.checkpoint.every = 5000
    c.checkpoint.keep_every = 25000
    c.train.eval_batch_size = 500
    # One decoding process per core but two (the training process, the device's feeding),
    # at most 16; a queue of one batch each (a 1024-image batch is ~150 MB of pixels).
    c.runtime.data_workers = max(1, min(16, (os.cpu_count() or 2) - 2))
    c.runtime.data_prefetch = 1
    if arg == "smoke":
        c.model.name = "resnet_tiny"
        c.data.image_size = 64
        c.optimizer.warmup_steps = 2
        c.pretrain.epochs = None
        c.pretrain.steps = 4
        c.finetune.steps = 4
        for p in (c.pretrain, c.finetune):
            p.batch_size = 8
            p.eval_every = 2
            p.log_every = 1
        c.checkpoint.every = 2
        c.train.eval_batch_size = 16
        c.runtime.data_workers = 1
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} of configs/imagenet.py; known: smoke")
    return c
