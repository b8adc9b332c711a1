"""`python -m clade_jax.paint --workdir=DIR [--port=8000] [--host=127.0.0.1] [--step=N]`.

Restores the run (latest checkpoint, EMA generator when kept), compiles it for its output size,
prints the address and serves the painting page until Ctrl-C. Binds 127.0.0.1 unless told
otherwise; `--host=0.0.0.0` (every interface) is logged as a warning.
"""

from __future__ import annotations

import argparse
import os

from absl import logging


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, load the model, serve."""
    p = argparse.ArgumentParser(
        prog="python -m clade_jax.paint", description=__doc__.split("\n")[0]
    )
    p.add_argument("--workdir", required=True, help="training or converted workdir")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1, local only)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--no_warmup", action="store_true", help="compile on the first request")
    args = p.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
        p.error(
            f"--workdir={args.workdir} holds no config.json: give a training workdir or one "
            "written by `python -m clade_jax.convert` (`make demo` trains workdirs/demo/clade)"
        )

    from clade_jax.paint.server import PaintModel, serve

    model = PaintModel.from_workdir(args.workdir, args.step)
    serve(model, host=args.host, port=args.port, warm_up=not args.no_warmup)


if __name__ == "__main__":
    from clade_jax.backend import configure_cpu_backend

    configure_cpu_backend()
    main()
