"""Shared defaults of every clade_jax config, and the `arg` syntax of all of them.

Every dataset config calls `get_config(arg)` here and overrides only what differs. `arg` is the part
after the colon in `--config=configs/ade20k.py:norm=spade,icpe,tiny`: comma-separated `key=value`
pairs or bare flags.

Flags and keys understood by every config:
  norm=clade|spade|none      model.norm
  pfn=batch|instance|switchable|switchable_nobatch   model.param_free_norm (+ switchable_batch)
  generator=NAME             model.generator: spade_clade (the SPADE/CLADE generator), pix2pixhd,
                             unpool
  icpe                       CLADE-ICPE positional encoding (data.icpe)
  vae                        multi-modal / style-guided model with the VAE encoder
  bf16                       compute_dtype bfloat16 (GPU / TPU)
  ema                        keep an EMA of the generator (decay 0.999)
  steps=N                    num_train_steps
  batch=N                    global batch size
  source=folder|tfds         read the dataset folders or the prepared TFDS data
  root=PATH                  dataset folder
  tiny                       shrink everything so a run takes seconds on a CPU (tests)
"""

from __future__ import annotations

import math

import ml_collections


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """Typed `arg` parsing in the style of big_vision's `parse_arg`.

    'norm=spade,icpe,steps=3' with spec `norm="", icpe=False, steps=0` gives
    `{norm: 'spade', icpe: True, steps: 3}`: every key of `spec` with its default unless given,
    each given value converted to the type of its default (bool: a bare flag is True, or
    `key=true|false|1|0`). An unknown key or a value of the wrong type is a ValueError naming it.
    """
    out = ml_collections.ConfigDict(spec)
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = (x.strip() for x in part.partition("="))
        if key not in spec:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(spec)}")
        default = spec[key]
        try:
            if isinstance(default, bool):
                if sep and value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = (not sep) or value.lower() in ("true", "1")
            elif not sep:
                raise ValueError("a value is needed")
            else:
                out[key] = type(default)(value)
        except ValueError:
            kind = type(default).__name__
            raise ValueError(f"config argument {part!r}: {key} takes a {kind}") from None
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The defaults (the papers' training setup on ADE20k-sized data)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # model init, augmentation and training randomness all derive from it
    # persistent XLA compilation cache: "" = JAX_COMPILATION_CACHE_DIR or ~/.cache/clade_jax/xla,
    # "none" = off (clade_jax/training/compile_cache.py)
    c.compilation_cache_dir = ""

    c.data = d = ml_collections.ConfigDict()
    d.dataset = (
        "synthetic"  # ade20k | ade20k_outdoor | coco_stuff | cityscapes | custom | synthetic
    )
    d.root = ""  # the dataset folder as users download it
    d.source = "folder"  # folder: read the files directly; tfds: the prepared array_record data
    d.tfds_data_dir = ""  # where `python -m clade_jax.data.prepare` wrote the TFDS data
    d.num_classes = 151  # label classes counting the don't-care class
    d.dontcare_label = 150  # id of the don't-care class; -1 if the dataset has none
    d.label_255_to = 150  # label 255 in a label PNG becomes this (official: label_nc); -1 keeps it
    d.preprocess = "resize_and_crop"  # resize_and_crop | fixed
    d.load_size = 286  # resize to this square before the random crop (resize_and_crop)
    d.crop_size = 256  # training width; height is crop_size / aspect_ratio
    d.aspect_ratio = 1.0  # width / height
    d.flip = True  # random horizontal flip in training
    d.use_instance = False  # instance maps (edges feed the generator and discriminator)
    d.icpe = False  # CLADE-ICPE: compute the intra-class positional map after augmentation
    d.label_resize = "pil"  # nearest rule for label maps in the loader: pil (official) | floor
    d.label_dir = ""  # custom layout: training label folder relative to root
    d.image_dir = ""  # custom layout: training image folder relative to root
    d.instance_dir = ""  # custom layout: optional training instance folder relative to root
    d.val_label_dir = ""  # custom layout: validation label folder relative to root
    d.val_image_dir = ""  # custom layout: validation image folder relative to root
    d.val_instance_dir = ""  # custom layout: optional validation instance folder
    d.include_portraits = True  # COCO-Stuff: also read train_*_portrait folders (official)
    d.num_workers = 2  # grain worker processes (0 = in-process; 4-8 on GPU hosts)
    d.read_threads = 2  # reading / augmenting threads per process
    d.prefetch_buffer = 4  # batches prefetched
    d.synthetic_size = 2000  # synthetic scenes: number of training examples
    d.synthetic_val_size = 64  # synthetic scenes: validation examples (a separate family)
    d.synthetic_resolution = 256  # synthetic scenes: rendered size before augmentation
    d.shuffle_seed = 0  # shuffle order (epochs derive their own order from it)
    d.max_examples = 0  # >0 truncates the dataset (debugging, tests)

    c.model = m = ml_collections.ConfigDict()
    m.generator = "spade_clade"  # spade_clade (norm: model.norm) | pix2pixhd | unpool (seed 003)
    m.norm = "clade"  # clade | spade | none
    m.param_free_norm = "batch"  # batch (synchronized over all devices) | instance | switchable
    m.switchable_batch = True  # switchable norm mixes batch statistics too (False: seed 003's)
    m.ngf = 64  # generator base width
    m.num_upsampling_layers = "normal"  # normal | more | most (latent grid crop/32, /64, /128)
    m.spectral_norm = True  # spectral norm on the generator's residual-block convs
    # SPADE on CPU: modulation convolutions only where the 5x5 label window is not uniform
    # (clade_jax/layers/spade_windows.py; equal up to float rounding; faster on piecewise-
    # constant label maps, slower where most pixels are boundaries). auto | on | off; "auto":
    # the trainer turns it on when >= 60% of the pixels of the first training batch are interior
    # (models.build.resolve_spade_windows) and records the choice in the workdir's config
    m.spade_windows = "auto"
    m.use_vae = False  # VAE style encoder + KL term (multi-modal, style-guided synthesis)
    m.z_dim = 256  # latent size of the VAE path
    m.unpool_num = -1  # unpool: upsamplings that unpool (-1: all but the last, seed 003)
    m.unpool_encoder_convs = ()  # unpool: convs per encoder stage (): VGG19's (2,2,4,4,4)
    m.unpool_encoder_norm = "instance"  # unpool: the encoder's param-free norm
    m.ndf = 64  # discriminator base width
    m.n_layers_D = 4  # convolutions per discriminator
    m.num_D = 2  # discriminator scales

    c.loss = lo = ml_collections.ConfigDict()
    lo.lambda_feat = 10.0  # feature matching
    lo.lambda_vgg = 10.0  # VGG19 perceptual loss (needs vgg_weights)
    lo.lambda_kld = 0.05  # KL term of the VAE
    lo.vgg_weights = ""  # torchvision vgg19 state dict (.pth) or its converted .npz

    c.optim = o = ml_collections.ConfigDict()
    o.lr_g = 1e-4  # TTUR: generator (and encoder) learning rate
    o.lr_d = 4e-4  # TTUR: discriminator learning rate
    o.beta1 = 0.0  # Adam beta1
    o.beta2 = 0.9  # Adam beta2

    c.batch_size = 32  # global batch over all devices and hosts
    c.num_epochs = 100  # epochs at the constant learning rate (official --niter)
    c.num_decay_epochs = 100  # epochs of linear decay to 0 after those (official --niter_decay)
    c.num_train_steps = 0  # > 0 overrides the epochs (decay then spans the second half)
    c.compute_dtype = "float32"  # float32 | bfloat16 (parameters and statistics stay float32)
    c.ema_decay = 0.0  # > 0 keeps an exponential moving average of the generator

    c.log_every_steps = 100  # scalars to TensorBoard
    c.image_every_steps = 1000  # image grids (label | synthesized | real) to TensorBoard
    c.checkpoint_every_steps = 2000  # orbax checkpoints (also at the end and on SIGTERM)
    c.keep_checkpoints = 3  # checkpoints kept
    c.save_initial_checkpoint = False  # also checkpoint step 0 (the demo evaluates it)
    c.eval_every_steps = 0  # > 0: FID / mIoU during training (0: only evaluate.py)
    c.num_image_samples = 8  # examples in each image grid

    c.eval = e = ml_collections.ConfigDict()
    e.split = "validation"  # split evaluate.py synthesizes
    e.batch_size = 16  # synthesis batch size
    e.max_images = 0  # > 0 evaluates on the first N images only
    e.segmenter_workdir = ""  # workdir of a segmenter trained with configs/segmenter.py
    e.protocol = "native"  # clade | spade | oasis | native (README: "Evaluation protocols")
    e.segmenter = ""  # "": the protocol's; upernet101 | deeplabv2 | drn_d_105 | a registry name
    e.segmenter_weights = ""  # the paper segmenter's published file(s), comma-separated
    return c


def dataset_config(
    dataset: str, *, num_classes: int, dontcare_label: int, label_255_to: int, **data
) -> ml_collections.ConfigDict:
    """The defaults (`get_config`) for one data set: its label conventions and whatever other
    `data` fields differ (sizes, instance maps, layout folders).

    Args:
      dataset: `data.dataset`.
      num_classes: label classes counting the don't-care class.
      dontcare_label: id of the don't-care class, -1 if none.
      label_255_to: what label 255 of a label PNG becomes (-1: kept, an error if out of range).
      **data: other `data` fields; an unknown name is a ValueError naming it.
    """
    c = get_config()
    if unknown := sorted(set(data) - set(c.data)):
        raise ValueError(f"{dataset}: unknown data fields {unknown}; known: {sorted(c.data)}")
    c.data.update(
        dict(
            dataset=dataset,
            num_classes=num_classes,
            dontcare_label=dontcare_label,
            label_255_to=label_255_to,
            **data,
        )
    )
    return c


ARG_SPEC = dict(  # the shared `arg` keys (module docstring) with their types and defaults
    norm="",
    pfn="",
    generator="",
    icpe=False,
    vae=False,
    bf16=False,
    ema=False,
    steps=0,
    batch=0,
    source="",
    root="",
    tiny=False,
)


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply the shared `arg` flags (see the module docstring) to a config, in place."""
    a = parse_arg(arg, **ARG_SPEC)
    if a.norm:
        c.model.norm = a.norm
    if a.pfn:
        c.model.param_free_norm = a.pfn.replace("_nobatch", "")
        c.model.switchable_batch = not a.pfn.endswith("_nobatch")
    if a.generator:
        c.model.generator = a.generator
    if a.icpe:
        c.data.icpe = True
    if a.vae:
        c.model.use_vae = True
    if a.ema:
        c.ema_decay = 0.999
    if a.source:
        c.data.source = a.source
    if a.root:
        c.data.root = a.root
    if a.tiny:
        shrink_to_tiny(c)
    apply_run_args(c, a)
    return c


def apply_run_args(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> None:
    """`steps=N`, `batch=N` and `bf16` of a parsed `arg` (after `tiny`, which they override); the
    GAN configs and the segmenter's share them."""
    if a.steps:
        c.num_train_steps = a.steps
    if a.batch:
        c.batch_size = a.batch
    if a.bf16:
        c.compute_dtype = "bfloat16"


def shrink_to_tiny(c: ml_collections.ConfigDict) -> None:
    """A configuration that trains in seconds on a CPU: 64-wide images, narrow networks."""
    from clade_jax.models.generator import NUM_UP  # imported only for tiny configs (jax)

    num_up = NUM_UP[c.model.num_upsampling_layers]
    c.data.crop_size = max(64, 2**num_up * math.ceil(c.data.aspect_ratio))  # latent grid >= 1
    c.data.load_size = c.data.crop_size + (8 if c.data.preprocess == "resize_and_crop" else 0)
    c.data.num_workers = 0
    c.data.synthetic_size = 16
    c.data.synthetic_resolution = 64
    c.model.ngf = 4
    c.model.ndf = 8
    c.model.n_layers_D = 3
    # One discriminator scale: the training step compiles 21% faster (15.3 against 19.4 s on 2
    # cores); the multiscale discriminator keeps its own tests (parity with the official one,
    # the CPU fast path on 2 and 3 scales).
    c.model.num_D = 1
    c.model.z_dim = 16
    c.loss.lambda_vgg = 0.0
    c.batch_size = 8  # divisible by the 8 host devices the tests use
    c.num_train_steps = 4
    # A constant learning rate makes the compiled step independent of num_train_steps, so tiny
    # runs of different lengths share one compilation (the tests' compilation cache).
    c.num_decay_epochs = 0
    c.log_every_steps = 2
    c.image_every_steps = 2
    c.checkpoint_every_steps = 2
    c.num_image_samples = 2
    c.eval.batch_size = 4
    c.eval.max_images = 8
