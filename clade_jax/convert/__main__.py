"""`python -m clade_jax.convert --official_dir=DIR --workdir=OUT` (see `workdir.py`)."""

from absl import app, flags

from clade_jax.convert.workdir import convert

flags.DEFINE_string("official_dir", None, "official checkpoint folder (opt.txt, *_net_G.pth)")
flags.DEFINE_string("workdir", None, "clade_jax workdir to write")
flags.DEFINE_string("epoch", "latest", "which official checkpoint (<epoch>_net_G.pth)")
flags.mark_flags_as_required(["official_dir", "workdir"])


def main(argv):
    del argv
    out = convert(flags.FLAGS.official_dir, flags.FLAGS.workdir, epoch=flags.FLAGS.epoch)
    print(f"wrote {out}")


if __name__ == "__main__":
    from clade_jax.backend import configure_cpu_backend

    configure_cpu_backend()
    app.run(main)
