"""Evaluate a run: flags -> `clade_jax.evaluation.evaluate.evaluate` (intentionally short).

    python evaluate.py --workdir=/runs/ade20k
    python evaluate.py --workdir=/runs/ade20k --step=20000 --segmenter_workdir=/runs/seg_ade20k
    python evaluate.py --workdir=/tmp/tiny --max_images=8 --fid_stats_dir=/tmp/fid_stats

Synthesizes the split with the checkpoint (latest by default, the EMA generator when there is one),
writes the images to `workdir/eval/<step>/images/`, and FID, mIoU and pixel accuracy to
`workdir/eval/<step>.json` and TensorBoard (`workdir/eval`). See the library's docstring.
"""

from absl import flags

from clade_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "training or converted workdir (config.json, checkpoints/)")
flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
flags.DEFINE_string("split", None, "data split (default: config.eval.split)")
flags.DEFINE_string("segmenter_workdir", None, "builtin segmenter workdir (default: config's)")
flags.DEFINE_string("segmenter", None, "registered segmenter name (default: builtin)")
flags.DEFINE_integer("max_images", None, "> 0: first N images; 0: all (default: config's)")
flags.DEFINE_integer("batch_size", None, "synthesis batch size (default: config.eval.batch_size)")
flags.DEFINE_string("fid_stats_dir", None, "cache of real FID statistics (default: ~/.cache)")
flags.DEFINE_bool("fid", True, "compute FID")
flags.DEFINE_bool("ema", True, "use the EMA generator when the run kept one")
flags.DEFINE_integer("seed", 0, "seed of the VAE latent codes")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from clade_jax.evaluation.evaluate import evaluate

    evaluate(
        FLAGS.workdir,
        step=FLAGS.step,
        split=FLAGS.split,
        segmenter_workdir=FLAGS.segmenter_workdir,
        segmenter=FLAGS.segmenter,
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
