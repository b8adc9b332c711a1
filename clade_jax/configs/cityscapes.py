"""Cityscapes (35 label ids, no don't-care) with instance maps, 1024x512 as in the CLADE paper.

    python train.py --config=configs/cityscapes.py:root=/data/cityscapes --workdir=DIR

Layout: leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/... *_gtFine_labelIds.png,
*_gtFine_instanceIds.png. The official SPADE preset trains at 512x256 (crop_size=512); the CLADE
paper's table uses 1024x512.
"""

from clade_jax.configs import common


def get_config(arg=None):
    c = common.get_config()
    c.data.dataset = "cityscapes"
    c.data.num_classes = 35  # label ids 0..34; no don't-care class
    c.data.dontcare_label = -1
    c.data.label_255_to = -1
    c.data.use_instance = True
    c.data.preprocess = "fixed"  # resize to crop_size x crop_size / aspect_ratio, no crop
    c.data.load_size = 1024
    c.data.crop_size = 1024
    c.data.aspect_ratio = 2.0
    c.model.num_upsampling_layers = "more"
    c.batch_size = 16
    c.num_epochs = 100
    c.num_decay_epochs = 100
    return common.apply_arg(c, arg)
