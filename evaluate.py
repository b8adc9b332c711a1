"""Evaluate a run: flags -> `clade_jax.evaluation.evaluate.evaluate` (intentionally short).

    python evaluate.py --workdir=/runs/ade20k
    python evaluate.py --workdir=/runs/ade20k --step=20000 --segmenter_workdir=/runs/seg_ade20k
    python evaluate.py --workdir=/tmp/tiny --max_images=8 --fid_stats_dir=/tmp/fid_stats
    python evaluate.py --workdir=/runs/cityscapes --protocol=clade \
        --segmenter_weights=/weights/drn-d-105_ms_cityscapes.pth
    python evaluate.py --workdir=/runs/ade20k --protocol=spade --segmenter=upernet101 \
        --segmenter_weights=/weights/ade20k-resnet101-upernet/
    python evaluate.py --workdir=/runs/cityscapes --protocol=spade \
        --segmenter_weights=/weights/drn-d-105_ms_cityscapes.pth --segmenter_size=1024x2048 \
        --pixel_accuracy=labeled   # the readings the published answers leave open (README)
    python evaluate.py --workdir=... --coordinator_address=host0:1234 --num_processes=2 \
        --process_id=0     # every process evaluates its shard (or --distributed on a pod)

Synthesizes the split with the checkpoint (latest by default, the EMA generator when there is one),
writes the images to `workdir/eval/<step>/images/`, and FID, mIoU and pixel accuracy to
`workdir/eval/<step>.json` and TensorBoard (`workdir/eval`). `--protocol` picks the papers'
evaluation protocol (README, "Evaluation protocols"); the paper protocols score with the data
set's paper segmenter, which needs `--segmenter_weights`. See the library's docstring.
"""

from absl import flags

from clade_jax import cli, distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "training or converted workdir (config.json, checkpoints/)")
flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
flags.DEFINE_string("split", None, "data split (default: config.eval.split)")
flags.DEFINE_string("segmenter_workdir", None, "builtin segmenter workdir (default: config's)")
flags.DEFINE_string(
    "protocol", None, "clade | spade | oasis | native (default: config.eval.protocol, else native)"
)
flags.DEFINE_string(
    "segmenter",
    None,
    "upernet101 | deeplabv2 | drn_d_105 | a registered name (default: the protocol's)",
)
flags.DEFINE_string(
    "segmenter_weights", None, "the paper segmenter's published file(s), comma-separated"
)
flags.DEFINE_enum(
    "pixel_accuracy",
    None,
    ["labeled", "all"],
    "which pixel accuracy is reported as pixel_accuracy (default: the protocol's)",
)
flags.DEFINE_string(
    "segmenter_size",
    None,
    "HxW the images are resized to for the segmenter, e.g. 1024x2048 (default: the output size)",
)
flags.DEFINE_integer("max_images", None, "> 0: first N images; 0: all (default: config's)")
flags.DEFINE_integer("batch_size", None, "synthesis batch size (default: config.eval.batch_size)")
flags.DEFINE_string("fid_stats_dir", None, "cache of real FID statistics (default: ~/.cache)")
flags.DEFINE_bool("fid", True, "compute FID")
flags.DEFINE_bool("ema", True, "use the EMA generator when the run kept one")
flags.DEFINE_integer("seed", 0, "seed of the VAE latent codes")
flags.mark_flags_as_required(["workdir"])
distributed.define_flags()


def _size(text):
    """ "1024x2048" -> (1024, 2048); None stays None."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--segmenter_size must be HxW, e.g. 1024x2048, got {text!r}") from None
    return h, w


def main(argv):
    del argv
    distributed.initialize_from_flags()
    from clade_jax.evaluation.evaluate import evaluate

    evaluate(
        FLAGS.workdir,
        step=FLAGS.step,
        split=FLAGS.split,
        segmenter_workdir=FLAGS.segmenter_workdir,
        protocol=FLAGS.protocol,
        segmenter=FLAGS.segmenter,
        segmenter_weights=FLAGS.segmenter_weights,
        pixel_accuracy=FLAGS.pixel_accuracy,
        segmenter_size=_size(FLAGS.segmenter_size),
        max_images=FLAGS.max_images,
        batch_size=FLAGS.batch_size,
        fid_stats_dir=FLAGS.fid_stats_dir,
        compute_fid=FLAGS.fid,
        use_ema=FLAGS.ema,
        seed=FLAGS.seed,
    )


if __name__ == "__main__":
    from clade_jax.backend import configure_cpu_backend

    configure_cpu_backend()
    cli.run(main)  # console lines, user errors -> one paragraph and exit 2, --traceback
