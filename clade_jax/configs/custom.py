"""A custom dataset: folders of label maps, photos and optional instance maps with matching names.

    python train.py --config=configs/custom.py:root=/data/mine --workdir=DIR

Edit num_classes / dontcare_label below to match the label PNGs.
"""

from clade_jax.configs import common


def get_config(arg=None):
    # label PNGs (uint8 / uint16 class ids) in labels/, photos with the same file stems in images/,
    # optional instance-id PNGs in instance_dir ("" = none); ADE20k-sized classes by default.
    c = common.dataset_config(
        "custom",
        num_classes=151,
        dontcare_label=150,
        label_255_to=150,
        label_dir="labels",
        image_dir="images",
        instance_dir="",
    )
    return common.apply_arg(c, arg)
