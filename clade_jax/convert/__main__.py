"""`python -m clade_jax.convert --official_dir=DIR --workdir=OUT` (see `workdir.py`)."""

from absl import flags, logging

from clade_jax import cli
from clade_jax.convert.workdir import convert

flags.DEFINE_string("official_dir", None, "official checkpoint folder (opt.txt, *_net_G.pth)")
flags.DEFINE_string("workdir", None, "clade_jax workdir to write")
flags.DEFINE_string("epoch", "latest", "which official checkpoint (<epoch>_net_G.pth)")
flags.mark_flags_as_required(["official_dir", "workdir"])


def main(argv):
    del argv
    out = convert(flags.FLAGS.official_dir, flags.FLAGS.workdir, epoch=flags.FLAGS.epoch)
    logging.info("wrote %s", out)


if __name__ == "__main__":
    cli.run(main)  # console lines, user errors -> one paragraph and exit 2, --traceback
