r"""CIFAR-style pretrain -> fine-tune: ResNet-18 (CIFAR stem) on CIFAR-100, then CIFAR-10.

A large source, a smaller target with another label set (new head). Reading needs the
datasets prepared as array_record in the data dir once (needs the `tf` extra and a network):

    jaxrepro prepare --dataset=cifar100 && jaxrepro prepare --dataset=cifar10
    python -m jaxrepro train --config=configs/cifar.py --workdir=runs/cifar

Expected: ~30 epochs of pretraining are hours on 2 CPU cores and minutes on one GPU. The
`smoke` variant (tiny ResNet, a few steps) is what the tests run on tfds mock data.
"""

from jaxrepro import config as config_lib


def get_config(arg=None):
    c = config_lib.base()
    c.model.name = "resnet18"
    c.model.stem = "cifar"
    c.data.source.name = "cifar100"
    c.data.target.name = "cifar10"
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
