"""A custom dataset: folders of label maps, photos and optional instance maps with matching names.

    python train.py --config=configs/custom.py:root=/data/mine --workdir=DIR

Edit num_classes / dontcare_label below to match the label PNGs.
"""

from clade_jax.configs import common


def get_config(arg=None):
    c = common.get_config()
    c.data.dataset = "custom"
    c.data.label_dir = "labels"  # label PNGs (uint8 / uint16 class ids)
    c.data.image_dir = "images"  # photos with the same file stems
    c.data.instance_dir = ""  # optional instance-id PNGs ("" = none)
    c.data.num_classes = 151
    c.data.dontcare_label = 150
    c.data.label_255_to = 150
    return common.apply_arg(c, arg)
