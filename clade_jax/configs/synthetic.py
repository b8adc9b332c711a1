"""The built-in synthetic scenes: CLADE learning procedural landscapes on a CPU (the demo's data).

    python train.py --config=configs/synthetic.py --workdir=/tmp/synthetic
    python train.py --config=configs/synthetic.py:tiny --workdir=/tmp/tiny   # seconds, for tests

Labels and photos are generated on the fly (`clade_jax.data.synthetic`); no files are needed.
"""

from clade_jax.configs import common


def get_config(arg=None):
    # clade_jax.data.synthetic: 9 classes + don't-care (9, patches of random colours); the scenes
    # are generated, so there are no label PNGs (255 never occurs). Rendered at 72, cropped to 64.
    c = common.dataset_config(
        "synthetic",
        num_classes=10,
        dontcare_label=9,
        label_255_to=-1,
        synthetic_resolution=72,
        load_size=72,
        crop_size=64,
    )
    c.model.ngf = 8  # small enough to train in minutes on 2 CPU cores
    c.model.ndf = 16
    c.model.n_layers_D = 3
    c.loss.lambda_vgg = 0.0  # no VGG19 weights are needed for the demo
    c.batch_size = 8
    c.num_epochs = 1  # with num_train_steps: constant for the first half ...
    c.num_decay_epochs = 1  # ... then linear decay to 0 over the second half
    c.num_train_steps = 1200
    c.log_every_steps = 50
    c.image_every_steps = 250
    c.checkpoint_every_steps = 400
    return common.apply_arg(c, arg)
