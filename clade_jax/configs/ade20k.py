"""ADE20k (150 classes + don't-care), 256x256: the CLADE / SPADE papers' setting.

    python train.py --config=configs/ade20k.py:root=/data/ADEChallengeData2016 --workdir=DIR
    python train.py --config=configs/ade20k.py:norm=spade,root=... --workdir=DIR   # SPADE
    python train.py --config=configs/ade20k.py:icpe,root=... --workdir=DIR         # CLADE-ICPE

The CLADE paper trains 200 epochs with Adam (0, 0.9), lr 1e-4 (G) / 4e-4 (D); the split into 100
constant + 100 linearly decaying epochs is the official SPADE recipe.
"""

from clade_jax.configs import common


def get_config(arg=None):
    c = common.get_config()
    c.data.dataset = "ade20k"
    c.data.num_classes = 151  # 150 classes + don't-care
    c.data.dontcare_label = 150  # raw label 0 ("unknown") becomes 150
    c.data.label_255_to = -1  # ADE20k annotations contain no 255: any 255 is an error
    c.data.preprocess = "resize_and_crop"
    c.data.load_size = 286
    c.data.crop_size = 256
    c.num_epochs = 100
    c.num_decay_epochs = 100
    return common.apply_arg(c, arg)
