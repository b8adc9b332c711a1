"""Train a clade_jax model: flags -> `train_and_evaluate` (this file is intentionally short).

    python train.py --config=configs/coco_stuff.py:root=/data/cocostuff --workdir=/runs/coco
    python train.py --config=configs/synthetic.py:tiny --workdir=/tmp/tiny

Starting on a workdir that holds a checkpoint resumes it. Multi-process runs (GPU clusters, TPU
pods) call `jax.distributed.initialize()`: pass --distributed for automatic detection (TPU, SLURM,
Open MPI) or --coordinator_address, --num_processes and --process_id explicitly.

The console shows clade_jax's lines (`-v 1`: every library's); a user error (bad flag, missing
weights, NaN loss) ends with one paragraph and exit code 2 (`--traceback` for the traceback).
"""

from absl import flags

from clade_jax import cli, configs, distributed

FLAGS = flags.FLAGS
configs.DEFINE_config("config")
flags.DEFINE_string("workdir", None, "output and resume directory")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    distributed.initialize_from_flags()
    if getattr(FLAGS.config, "task", "gan") == "segmenter":
        from clade_jax.evaluation.segmenter import train_segmenter

        train_segmenter(FLAGS.config, FLAGS.workdir)
    else:
        from clade_jax.training import train_and_evaluate

        train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
