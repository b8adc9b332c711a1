"""Cityscapes (35 label ids, no don't-care) with instance maps, 1024x512 as in the CLADE paper.

    python train.py --config=configs/cityscapes.py:root=/data/cityscapes --workdir=DIR

Layout: leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/... *_gtFine_labelIds.png,
*_gtFine_instanceIds.png. The official SPADE preset trains at 512x256 (crop_size=512); the CLADE
paper's table uses 1024x512.
"""

from clade_jax.configs import common


def get_config(arg=None):
    # Label ids 0..34, no don't-care class; "fixed": resized to 1024 x 512, no crop.
    c = common.dataset_config(
        "cityscapes",
        num_classes=35,
        dontcare_label=-1,
        label_255_to=-1,
        use_instance=True,
        preprocess="fixed",
        load_size=1024,
        crop_size=1024,
        aspect_ratio=2.0,
    )
    c.model.num_upsampling_layers = "more"
    c.batch_size = 16
    return common.apply_arg(c, arg)
