"""ADE20k-outdoor: the outdoor-scene subset of ADE20k, same layout and classes as ADE20k.

python -m clade_jax.data.ade20k_outdoor --help      # how the subset is selected
python train.py --config=configs/ade20k_outdoor.py:root=/data/ADE20k_outdoor --workdir=DIR
"""

from clade_jax.configs import ade20k, common


def get_config(arg=None):
    c = ade20k.get_config()
    c.data.dataset = "ade20k_outdoor"
    return common.apply_arg(c, arg)
