"""A segmenter for scoring synthesized images (mIoU, pixel accuracy) on any data set.

    python train.py --config=configs/segmenter.py:dataset=synthetic --workdir=/tmp/seg_synth
    python train.py --config=configs/segmenter.py:dataset=ade20k,root=/data/ADE --workdir=DIR
    python train.py --config=configs/segmenter.py:dataset=synthetic,tiny --workdir=/tmp/t  # tests

Trains `clade_jax.evaluation.segmenter.SegmenterNet` (a compact U-Net) on the real training images
of the named dataset config and reports validation mIoU / pixel accuracy at the end. On the
synthetic scenes the default run (3000 steps, batch 16, 64x64) takes a few minutes on a GPU and
reaches well above 90% pixel accuracy; a generator's images are then scored with
`eval.segmenter_workdir` pointing at this workdir. The papers' segmenters (UperNet101, DeepLabv2,
DRN-D-105) give the published numbers; this one only ranks generators against each other.

Arguments (comma-separated, after the colon):
  dataset=NAME   any dataset config of clade_jax.configs (synthetic, ade20k, coco_stuff, ...)
  root=PATH, source=folder|tfds   passed to the dataset config
  width=N        base width (stage widths N, 2N, 4N, ...; as many stages as without it)
  steps=N, batch=N, lr=X
  bf16           bfloat16 compute
  tiny           ~20 s on a 2-core CPU: 32x32 crops, widths (16, 32, 64), 120 steps (synthetic
                 scenes: 96-97% validation pixel accuracy, mIoU ~0.8-0.86 over seeds 0-4)
"""

from __future__ import annotations

import ml_collections

from clade_jax import configs
from clade_jax.configs import common

_DATA_ARGS = dict(root="", source="", tiny=False)  # what the dataset config understands


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = common.parse_arg(
        arg, dataset="synthetic", width=0, steps=0, batch=0, lr=0.0, bf16=False, **_DATA_ARGS
    )
    # What the dataset config itself understands, passed on as given.
    data_arg = ",".join(
        k if v is True else f"{k}={v}" for k in _DATA_ARGS if (v := a[k]) not in ("", False)
    )

    c = ml_collections.ConfigDict()
    c.task = "segmenter"  # train.py dispatches on this
    c.seed = 0  # init and data order
    c.data = configs.load(a.dataset, data_arg or None).data
    c.data.use_instance = False  # the segmenter needs photos and labels only
    c.data.icpe = False

    c.model = m = ml_collections.ConfigDict()
    m.widths = (32, 64, 128, 256)  # channels per resolution, finest first (3 downsamplings)
    m.depth = 2  # conv-BN-ReLU layers per stage

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 2e-3  # peak AdamW learning rate
    o.warmup_steps = 100  # linear warm-up
    o.final_lr_fraction = 0.01  # cosine decay ends at lr * this
    o.beta1 = 0.9  # Adam beta1
    o.beta2 = 0.999  # Adam beta2
    o.weight_decay = 1e-4  # decoupled weight decay

    c.batch_size = 16  # global batch over all devices and hosts
    c.num_train_steps = 3000  # optimizer steps
    c.compute_dtype = "float32"  # float32 | bfloat16 (BatchNorm and logits stay float32)
    c.log_every_steps = 50  # scalars to TensorBoard
    c.checkpoint_every_steps = 1000  # orbax checkpoints (also at the end)
    c.keep_checkpoints = 2  # checkpoints kept
    c.write_tensorboard = True  # clu metric writer in the workdir

    c.eval = e = ml_collections.ConfigDict()
    e.at_end = True  # score the validation split after training
    e.split = "validation"  # split scored
    e.batch_size = 16  # images per segmenter call
    e.max_images = 0  # > 0 scores the first N images only

    if a.tiny:
        c.data.crop_size = 32
        c.data.load_size = 36 if c.data.preprocess == "resize_and_crop" else 32
        c.data.synthetic_resolution = 36
        c.model.widths = (16, 32, 64)
        c.optim.lr = 5e-3
        c.optim.warmup_steps = 5
        c.batch_size = 8
        c.num_train_steps = 120
        c.log_every_steps = 20
        c.checkpoint_every_steps = 60
        c.eval.batch_size = 8
        c.eval.max_images = 16
    if a.width:
        c.model.widths = tuple(a.width * 2**i for i in range(len(c.model.widths)))
    if a.lr:
        c.optim.lr = a.lr
    common.apply_run_args(c, a)
    return c
