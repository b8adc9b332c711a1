"""`python -m clade_jax.paint --workdir=DIR [--port=8000] [--host=127.0.0.1] [--step=N]`.

Restores the run (latest checkpoint, EMA generator when kept), compiles it for its output size,
prints the address and serves the painting page until Ctrl-C. Binds 127.0.0.1 unless told
otherwise; `--host=0.0.0.0` (every interface) is logged as a warning. Console and user errors as
every entry point (`clade_jax.cli`): a bad flag or workdir ends with one paragraph and exit code 2.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from clade_jax import cli

PROGRAM = "python -m clade_jax.paint"
FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The flags, defined on first use only (importing this module defines none)."""
    if "no_warmup" in FLAGS:
        return
    flags.DEFINE_string("workdir", None, "training or converted workdir")
    flags.DEFINE_integer("port", 8000, "TCP port")
    flags.DEFINE_string("host", "127.0.0.1", "interface (default 127.0.0.1, local only)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.DEFINE_bool("no_warmup", False, "compile on the first request")


def _serve(argv: list[str]) -> None:
    """Check the workdir, load the model, serve (flags parsed)."""
    del argv
    workdir = FLAGS.workdir
    if not workdir:
        raise ValueError("--workdir is required: a training workdir or a converted one")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(
            f"workdir={workdir} holds no config.json: give a training workdir or one written "
            "by `python -m clade_jax.convert` (`make demo` trains workdirs/demo/clade)"
        )

    from clade_jax.paint.server import PaintModel, serve

    model = PaintModel.from_workdir(workdir, FLAGS.step)
    serve(model, host=FLAGS.host, port=FLAGS.port, warm_up=not FLAGS.no_warmup)


def main(argv: list[str] | None = None) -> None:
    """Run the command line `argv` (the flags; default: the process's own)."""
    _define_flags()
    cli.run(_serve, argv=[PROGRAM, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
