"""COCO-Stuff (182 classes + don't-care) with instance maps, 256x256.

    python train.py --config=configs/coco_stuff.py:root=/data/cocostuff --workdir=DIR

Layout: {train,val}_img, {train,val}_label, {train,val}_inst (the official SPADE layout).
The CLADE paper trains 50 epochs on COCO-Stuff because of its size.
"""

from clade_jax.configs import common


def get_config(arg=None):
    # 182 classes + don't-care; unlabeled pixels (255) become don't-care, as officially.
    c = common.dataset_config(
        "coco_stuff", num_classes=183, dontcare_label=182, label_255_to=182, use_instance=True
    )
    c.num_epochs, c.num_decay_epochs = 50, 0
    return common.apply_arg(c, arg)
