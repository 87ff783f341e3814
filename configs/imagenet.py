r"""ResNet-50 on ImageNet-2012 (the usual recipe, with Adam), then fine-tuned on Imagenette.

ImageNet needs its tars in the TFDS manual dir and the `tf` extra to prepare, once:

    jaxrepro prepare --dataset=imagenet2012 --data_dir=/data/tfds
    jaxrepro prepare --dataset=imagenette --data_dir=/data/tfds
    python -m jaxrepro train --config=configs/imagenet.py --workdir=runs/in1k \
        --config.data.data_dir=/data/tfds

Expected: 90 epochs at global batch 1024 (~112k steps) to ~75-76% top-1 on 8 GPUs or a TPU
slice in about a day; Adam with 5 warmup epochs and cosine decay, decoupled weight decay.
`smoke` shrinks everything (tiny model, 64x64, a few steps) for a CPU check.
"""

from jaxrepro import config as config_lib


def get_config(arg=None):
    c = config_lib.base()
    c.model.name = "resnet50"
    c.model.stem = "imagenet"
    c.model.zero_init_residual = True
    c.data.source.name = "imagenet2012"
    c.data.source.eval_split = "validation"
    c.data.target.name = "imagenette"
    c.data.target.eval_split = "validation"
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
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} of configs/imagenet.py; known: smoke")
    return c
