r"""The paper's study design: augmentation recipes, initialisations, remedies.

    jaxrepro study --design=configs/studies/paper.py --out=results/paper         # make paper
    jaxrepro study --design=configs/studies/paper.py:quick --out=runs/digits_aug  # make study

Arms (the first is the baseline; each its own seeds, 8 per arm here):

* ``pad4``: the digits recipe (configs/digits.py), augmentation seeds 0-7, crop padding 4.
* ``pad3``: the same seeds with crop padding 3: a marginally different augmentation.
* ``init``: initialisation seeds 0-7 (augmentation held at its base seed).
* ``zero_init_residual``: the same init seeds, each residual branch's last BatchNorm
  scale at 0 (Goyal et al. 2017): the alternative layer initialisation.
* ``lr_half``, ``warmup``, ``clip``: remedies, small tweaks of fine-tuning: its learning
  rate x0.5, a linear warmup over its first 20 steps, global-norm gradient clipping at 1.
  Each run is a branch of the baseline run of the same augmentation seed from its
  checkpoint at the start of fine-tuning, the tweak applied there: pretraining is the
  baseline's, bit for bit, so each remedy is compared with its baseline seed by seed.
* ``width32_init``: the appendix's second configuration (Fig. 3): initialisation seeds
  0-7 of a ResNet-50 of half width (32 channels at the stem).

Cost: 40 full runs (the width-32 ones about a third of a run) and 24 branches of the
fine-tuning only: about 50 digits runs, ~45 s each on an AVX-512 CPU and ~100 s on an
AVX2 one (2 cores), so ~40 and ~85 minutes, plus the analysis. ``:quick`` is the
baseline at 3 seeds and ``pad3_ft``, crop padding 3 in fine-tuning only (a branch of each
baseline run at the fine-tune start): ``make study``, 3 runs and 3 fine-tunings.
"""

import os

from jaxrepro import config as config_lib

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "digits.py")


def get_design(variant=None):
    recipe = config_lib.load_config_file(RECIPE)
    finetune_lr = recipe.finetune.lr if recipe.finetune.lr is not None else recipe.optimizer.lr
    pad4 = {"data.augment.crop.padding": 4}
    arms = [
        {
            "name": "pad4",
            "vary": "aug",
            "seeds": "0-7",
            "overrides": pad4,
            "description": "the recipe, crop padding 4",
        },
        {
            "name": "pad3",
            "overrides": {"data.augment.crop.padding": 3},
            "description": "crop padding 3: a marginally different augmentation",
        },
        {
            "name": "init",
            "vary": "init",
            "overrides": pad4,
            "description": "initialisation seeds",
        },
        {
            "name": "zero_init_residual",
            "vary": "init",
            "overrides": dict(pad4, **{"model.zero_init_residual": True}),
            "description": "the alternative layer initialisation: residual branches start at 0",
        },
        {
            "name": "lr_half",
            "branch": "finetune",
            "overrides": {"finetune.lr": finetune_lr * 0.5},
            "description": "remedy: fine-tuning learning rate x0.5",
        },
        {
            "name": "warmup",
            "branch": "finetune",
            "overrides": {"finetune.warmup_steps": 20},
            "description": "remedy: linear warmup over fine-tuning's first 20 steps",
        },
        {
            "name": "clip",
            "branch": "finetune",
            "overrides": {"optimizer.clip_norm": 1.0},
            "description": "remedy: global-norm gradient clipping at 1.0 in fine-tuning",
        },
        {
            "name": "width32_init",
            "vary": "init",
            "overrides": dict(pad4, **{"model.width": 32}),
            "description": "second configuration (appendix): half-width ResNet-50, init seeds",
        },
    ]
    design = {
        "config": "../digits.py",
        "description": (
            "augmentation recipes x seeds, initialisations, fine-tuning remedies. The recipe "
            "(configs/digits.py) fine-tunes with Adam at a constant 3e-3 after a healthy, "
            "gently scheduled pretraining: measured on 4 seeds, the pretraining's own schedule "
            "(1e-3, cosine) fine-tunes every seed smoothly, so **the phenomenon here needs this "
            "aggressive fine-tuning step** (results/recipes/README.md)."
        ),
        "arms": arms,
    }
    if variant == "quick":
        # The marginal change made where the mission's users meet it: in fine-tuning, on one
        # pretrained network per seed (a branch at the fine-tune start, paired by seed), so
        # the main job trains 3 networks and 3 fine-tunings instead of 6 networks.
        pad3_ft = {
            "name": "pad3_ft",
            "branch": "finetune",
            "overrides": {"data.augment.crop.padding": 3},
            "description": "crop padding 3 in fine-tuning only: a marginally different "
            "augmentation of the same pretrained network",
        }
        design["arms"] = [dict(arms[0], seeds="0-2"), pad3_ft]
        design["description"] = (
            "two augmentation recipes of fine-tuning (crop padding 4, 3) x 3 seeds, on the "
            "same pretrained network per seed. " + design["description"].split(". ", 1)[1]
        )
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r} of configs/studies/paper.py; known: quick")
    return design
