"""COCO-Stuff (182 classes + don't-care) with instance maps, 256x256.

    python train.py --config=configs/coco_stuff.py:root=/data/cocostuff --workdir=DIR

Layout: {train,val}_img, {train,val}_label, {train,val}_inst (the official SPADE layout).
The CLADE paper trains 50 epochs on COCO-Stuff because of its size.
"""

from clade_jax.configs import common


def get_config(arg=None):
    c = common.get_config()
    c.data.dataset = "coco_stuff"
    c.data.num_classes = 183  # 182 classes + don't-care
    c.data.dontcare_label = 182
    c.data.label_255_to = 182  # unlabeled pixels (255) become don't-care, as officially
    c.data.use_instance = True
    c.data.preprocess = "resize_and_crop"
    c.data.load_size = 286
    c.data.crop_size = 256
    c.num_epochs = 50
    c.num_decay_epochs = 0
    return common.apply_arg(c, arg)
