r"""CIFAR-scale pretrain -> fine-tune: ResNet-18 (CIFAR stem) on CIFAR-100, then SVHN.

The target is another domain at the same 32x32 scale: SVHN (TFDS ``svhn_cropped``, Netzer
et al. 2011), digits cropped from Google Street View photos of house numbers, 10 classes,
73,257 train and 26,032 test images, against CIFAR-100's 100 object classes. Pretraining
teaches object features; the fine-tune must read printed digits under street lighting: a
new head and a real shift of content, colour statistics and label set (CIFAR-10, the old
target, comes from the same image collection as CIFAR-100). Both download automatically
(~1.6 GB in all). Preparing needs the `tf` extra and a network, once:

    jaxrepro prepare --config=configs/cifar.py
    python -m jaxrepro train --config=configs/cifar.py --workdir=runs/cifar

Both train splits fit in memory decoded (150 MB and 225 MB), so no data workers are
needed. Expected: ~30 epochs of pretraining are hours on 2 CPU cores and minutes on one
GPU. The `smoke` variant (tiny ResNet, a few steps) is what the tests run on tfds mock data.
"""

from jaxrepro import config as config_lib


def get_config(arg=None):
    c = config_lib.base()
    c.model.name = "resnet18"
    c.model.stem = "cifar"
    c.data.source.name = "cifar100"
    c.data.target.name = "svhn_cropped"
    c.data.image_size = 32
    c.data.normalize.mean = (0.507, 0.487, 0.441)
    c.data.normalize.std = (0.267, 0.256, 0.276)
    c.data.augment.crop.padding = 4
    c.data.augment.flip.enabled = True
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 500
    c.pretrain.epochs = 30
    c.pretrain.batch_size = 128
    c.pretrain.eval_every = 1000
    c.pretrain.log_every = 10
    c.finetune.steps = 2000
    c.finetune.batch_size = 128
    c.finetune.lr = 3e-4
    c.finetune.eval_every = 200
    c.finetune.log_every = 10
    c.checkpoint.every = 1000
    c.train.eval_batch_size = 500
    if arg == "smoke":
        c.model.name = "resnet_tiny"
        c.optimizer.warmup_steps = 2
        c.pretrain.epochs = None
        c.pretrain.steps = 6
        c.finetune.steps = 4
        for p in (c.pretrain, c.finetune):
            p.batch_size = 8
            p.eval_every = 3
            p.log_every = 1
        c.checkpoint.every = 3
        c.train.eval_batch_size = 16
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} of configs/cifar.py; known: smoke")
    return c
