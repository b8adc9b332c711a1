"""ADE20k (150 classes + don't-care), 256x256: the CLADE / SPADE papers' setting.

    python train.py --config=configs/ade20k.py:root=/data/ADEChallengeData2016 --workdir=DIR
    python train.py --config=configs/ade20k.py:norm=spade,root=... --workdir=DIR   # SPADE
    python train.py --config=configs/ade20k.py:icpe,root=... --workdir=DIR         # CLADE-ICPE

The CLADE paper trains 200 epochs with Adam (0, 0.9), lr 1e-4 (G) / 4e-4 (D); the split into 100
constant + 100 linearly decaying epochs is the official SPADE recipe.
"""

from clade_jax.configs import common


def get_config(arg=None):
    # 150 classes + don't-care: raw label 0 ("unknown") becomes 150; ADE20k annotations contain no
    # 255, so any 255 is an error. Sizes (286 -> 256 crop) and epochs (100 + 100) are the defaults.
    c = common.dataset_config("ade20k", num_classes=151, dontcare_label=150, label_255_to=-1)
    return common.apply_arg(c, arg)
