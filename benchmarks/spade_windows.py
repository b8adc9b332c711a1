"""SPADE's windowed modulation against the dense one: the full training step, A/B in one process.

`model.spade_windows="auto"` (the default) turns the windowed modulation
(`clade_jax/layers/spade_windows.py`) on when the first batch's interior fraction is at least
`spade_windows.AUTO_MIN_INTERIOR`. This script measures where that break-even lies on this
machine: for each label-map kind (`--regions`: Voronoi regions per map, 0 = every pixel its own
random class) a fresh process compiles the full-size ADE20k SPADE training step (no VGG, state
donated, as `benchmarks/training.py` builds it) twice, windows on and off, and runs them
alternately, `--rounds` rounds of `--steps` steps each, so both see the same machine state.
Prints, per kind, the interior fraction, both medians, windows / dense, the step temporaries, and
the choice that "auto" makes, and appends a dated block to benchmarks/RESULTS.md.

    python benchmarks/spade_windows.py --regions 40,150,0 --rounds 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import results as results_md  # noqa: E402  (benchmarks/results.py)
from training import _peak_rss_gb, region_labels  # noqa: E402  (benchmarks/training.py)


def child(batch: int, size: int, regions: int, rounds: int, steps: int) -> dict:
    """Both programs in this process, steps alternating; returns the numbers as a dict."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from clade_jax.configs import ade20k
    from clade_jax.layers import spade_windows
    from clade_jax.models import build
    from clade_jax.training import runtime
    from clade_jax.training import step as step_lib
    from clade_jax.training.memory import release_host_memory
    from clade_jax.training.state import GANState

    rng = np.random.default_rng(0)
    labels = region_labels(rng, batch, size, regions)
    data = {
        "label": jnp.asarray(labels),
        "image": jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32),
    }
    key = jax.random.key(0)
    out: dict = {"regions": regions}
    programs = {}
    for windows in ("on", "off"):
        config = ade20k.get_config("norm=spade")
        config.loss.lambda_vgg = 0.0
        config.data.crop_size = size
        config.model.spade_windows = windows
        make = lambda k, config=config: GANState(config, 1000, rngs=nnx.Rngs(k))
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda make=make: make(runtime.init_key(0))))
        fn = jax.jit(
            functools.partial(step_lib.train_step, graphdef, loss_cfg=config.loss, ema_decay=0.0),
            donate_argnums=(0,),
        )
        t = time.perf_counter()
        compiled = fn.lower(abstract, data, jnp.int32(0), key, None).compile()
        out[f"compile_{windows}_s"] = time.perf_counter() - t
        out[f"temp_{windows}_gb"] = compiled.memory_analysis().temp_size_in_bytes / 1e9
        release_host_memory()
        state = jax.jit(lambda k, make=make: nnx.split(make(k))[1])(runtime.init_key(0))
        programs[windows] = {"compiled": compiled, "state": state, "step": 0, "times": []}

    def run(p):
        p["state"], metrics = p["compiled"](p["state"], data, jnp.int32(p["step"]), key, None)
        p["step"] += 1
        jax.block_until_ready(metrics)

    for p in programs.values():
        run(p)  # warm-up
    for _ in range(rounds):
        for p in programs.values():
            for _ in range(steps):
                t = time.perf_counter()
                run(p)
                p["times"].append(time.perf_counter() - t)
    for windows, p in programs.items():
        out[f"step_{windows}_s"] = statistics.median(p["times"])
    out["interior"] = spade_windows.interior_fraction(labels, config.data.num_classes)
    auto = ade20k.get_config("norm=spade")  # what the trainer's default would pick here
    out["auto"] = build.resolve_spade_windows(auto, out["interior"])
    out["peak_rss_gb"] = _peak_rss_gb()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regions", default="40,150,0", help="label-map kinds, one process each")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4, help="alternations of the two programs")
    p.add_argument("--steps", type=int, default=1, help="steps of one program per round")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no_results", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args()
    if args.child is not None:
        from clade_jax import backend

        backend.configure_cpu_backend()
        print(json.dumps(child(args.batch, args.size, args.child, args.rounds, args.steps)))
        return

    from clade_jax.layers import spade_windows

    rows = []
    for regions in [int(r) for r in args.regions.split(",")]:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(regions)]
        cmd += ["--batch", str(args.batch), "--size", str(args.size)]
        cmd += ["--rounds", str(args.rounds), "--steps", str(args.steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"--regions {regions} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"## spade_windows.py, {datetime.datetime.now():%Y-%m-%d %H:%M} ({os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, SPADE b{args.batch}, {args.size}x{args.size}, "
        f"{args.rounds} alternating rounds of {args.steps} step(s), both programs in one process)",
        "",
        "| label maps | interior | windows step s | dense step s | windows / dense "
        "| temp GB windows / dense | auto picks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind = f"{r['regions']} regions" if r["regions"] else "random per pixel"
        lines.append(
            f"| {kind} | {r['interior']:.3f} | {r['step_on_s']:.2f} | {r['step_off_s']:.2f} "
            f"| {r['step_on_s'] / r['step_off_s']:.3f} "
            f"| {r['temp_on_gb']:.3f} / {r['temp_off_gb']:.3f} | {r['auto']} |"
        )
    lines.append(f"\n(threshold: interior >= {spade_windows.AUTO_MIN_INTERIOR})")
    results_md.report("\n".join(lines) + "\n", append=not args.no_results)


if __name__ == "__main__":
    from clade_jax.backend import configure_cpu_backend

    configure_cpu_backend()
    main()
