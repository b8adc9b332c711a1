"""The GAN training step and its parts, CLADE vs SPADE vs the convolution-only floor.

    python benchmarks/training.py [--rounds 2] [--batches 1,4] [--norms clade,spade]
                                  [--floor_batches 1] [--size 256] [--steps 3]

Full-size ADE20k networks (151 classes, ngf 64, ndf 64, two discriminator scales, no VGG loss),
one G update + one D update per step (`clade_jax.training.step.train_step`), label maps of
`--regions` Voronoi regions of random classes (default 40; `--regions 0`: every pixel its own random
class, the workload of the blocks before 2026-12-02 14:00), random images, state donated.
`--spade_windows auto|on|off` sets `model.spade_windows` (SPADE's modulation only at boundary
pixels, whose cost depends on the label maps); "auto" (the default, as in training) is resolved
from the benchmark's label maps as the trainer resolves it from its first batch; the children
report the interior fraction and the choice. Every (model, batch) runs in a fresh process, the
processes alternating within each round, so each process's peak RSS is that of one training
process. Each process reports:

* compile: lowering + XLA compilation of the step (the first round with an empty persistent
  compilation cache, later rounds with the cache the first one filled), and
  `compiled.memory_analysis()` (the step's temporary buffers);
* step: median of `--steps` whole steps after one warm-up step; peak RSS after them;
* parts (first round only): G step (G forward, D on [fake; real], backward to G, Adam), D step
  (regenerate the fake, D forward + backward, Adam), D forward + backward alone (the weight
  gradients, given a fake), G regeneration (G forward in training mode, no gradient).

`norm=none` is the floor: the same convolutions with the normalizations removed. The official
PyTorch trainer cannot be run from this repository (its licence forbids copying it); the
official figures measured side by side on this machine are quoted in docs and the issue notes,
and this script compares the parts against each other and against the floor. Appends a dated
block to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import results as results_md  # noqa: E402  (benchmarks/results.py)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def region_labels(rng, batch: int, size: int, regions: int, classes: int = 151):
    """(batch, size, size) int32 label maps of `regions` Voronoi cells, each one random class: a
    stand-in for a semantic label map's piecewise-constant regions (the data sets are not here).
    `regions=0`: every pixel its own random class (no uniform region at all)."""
    import numpy as np

    if regions == 0:
        return rng.integers(0, classes, (batch, size, size)).astype(np.int32)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((batch, size, size), np.int32)
    for b in range(batch):
        centres = rng.uniform(0, size, (regions, 2))
        dist = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
        out[b] = rng.integers(0, classes, regions)[dist.argmin(-1)]
    return out


def child(
    norm: str, batch: int, size: int, steps: int, parts: bool, regions: int, windows: str
) -> dict:
    """Measure one (norm, batch) in this process; returns the numbers as a dict."""
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

    config = ade20k.get_config(f"norm={norm}")
    config.loss.lambda_vgg = 0.0
    config.data.crop_size = size
    config.model.spade_windows = windows
    rng = np.random.default_rng(0)
    labels = region_labels(rng, batch, size, regions)
    inner = spade_windows.interior_fraction(labels, config.data.num_classes)
    build.resolve_spade_windows(config, inner)  # "auto" -> on / off, as the trainer does
    # Built as the trainer builds it (clade_jax.training.loop): one jit-compiled initialization,
    # not op by op (eager init leaves ~0.2 GB of per-op executables in jax's caches).
    # The step is compiled from shapes before the state exists, as the trainer does.
    make = lambda key: GANState(config, 1000, rngs=nnx.Rngs(key))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: make(runtime.init_key(0))))
    data = {
        "label": jnp.asarray(labels),
        "image": jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32),
    }
    key = jax.random.key(0)
    fn = jax.jit(
        functools.partial(step_lib.train_step, graphdef, loss_cfg=config.loss, ema_decay=0.0),
        donate_argnums=(0,),
    )
    t = time.perf_counter()
    compiled = fn.lower(abstract_state, data, jnp.int32(0), key, None).compile()
    out = {"compile_s": time.perf_counter() - t, "interior": inner}
    out["spade_windows"] = config.model.spade_windows
    mem = compiled.memory_analysis()
    out["temp_gb"] = mem.temp_size_in_bytes / 1e9
    out["state_gb"] = mem.argument_size_in_bytes / 1e9
    release_host_memory()
    state = jax.jit(lambda key: nnx.split(make(key))[1])(runtime.init_key(0))
    release_host_memory()
    holder = {"state": state, "step": 0}

    def run():
        holder["state"], metrics = compiled(
            holder["state"], data, jnp.int32(holder["step"]), key, None
        )
        holder["step"] += 1
        jax.block_until_ready(metrics)

    run()  # warm-up
    out["step_s"] = _median_time(run, steps)
    out["peak_rss_gb"] = _peak_rss_gb()
    if not parts:
        return out

    loss_cfg = config.loss

    def g_step(st):
        m = nnx.merge(graphdef, st)
        step_lib.g_update(m, data, key, None, loss_cfg, 0.0)
        return nnx.state(m)

    def d_step(st):
        m = nnx.merge(graphdef, st)
        step_lib.d_update(m, data, key)
        return nnx.state(m)

    def d_fwd_bwd(st, fake):
        m = nnx.merge(graphdef, st)
        return nnx.grad(lambda d: step_lib.discriminator_losses(d, data, fake)[0])(m.d)

    def g_regen(st):
        m = nnx.merge(graphdef, st)
        return step_lib.generate(m.gen, data, key)[0]

    fake = jax.jit(g_regen)(holder["state"])
    for name, f, args, donate in [
        ("g_step", g_step, (), True),
        ("d_step", d_step, (), True),
        ("d_fwd_bwd", d_fwd_bwd, (fake,), False),
        ("g_regen", g_regen, (), False),
    ]:
        jf = jax.jit(f, donate_argnums=(0,) if donate else ())

        def call(jf=jf, args=args, donate=donate):
            res = jf(holder["state"], *args)
            if donate:
                holder["state"] = res
            jax.block_until_ready(res)

        call()  # compile + warm-up
        out[name + "_s"] = _median_time(call, steps)
    return out


def windows_note(res: dict) -> str:
    """' (windows on, interior 0.77)' for a SPADE cell whose windowed modulation was on."""
    if res.get("spade_windows") == "on":
        return f" (windows on, interior {res['interior']:.2f})"
    return ""


def run_child(norm, batch, args, parts, cache_dir, ynnpack=False) -> dict:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir)
    if ynnpack:  # jaxlib's default convolutions instead of the Eigen ones the entry points pick
        env["CLADE_JAX_KEEP_XLA_FLAGS"] = "1"
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{norm},{batch}"]
    cmd += ["--size", str(args.size), "--steps", str(args.steps)] + (["--parts"] if parts else [])
    cmd += ["--regions", str(args.regions)] + ["--spade_windows", args.windows]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{norm} batch {batch} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--norms", default="clade,spade")
    p.add_argument("--floor_batches", default="1", help="batches at which norm=none is run")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--regions",
        type=int,
        default=40,
        help="Voronoi regions per label map (0: an independent random class per pixel)",
    )
    p.add_argument(
        "--spade_windows",
        dest="windows",
        default="auto",
        choices=["auto", "on", "off"],
        help="model.spade_windows: SPADE's uniform-window tables (clade_jax.layers.spade_windows)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--parts", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no_results", action="store_true", help="do not append to RESULTS.md")
    p.add_argument(
        "--ynnpack_batches", default="", help="batches at which CLADE also runs on YNNPACK"
    )
    args = p.parse_args()
    if args.child:
        from clade_jax import backend

        backend.configure_cpu_backend()
        norm, batch = args.child.split(",")
        res = child(norm, int(batch), args.size, args.steps, args.parts, args.regions, args.windows)
        print(json.dumps(res))
        return

    configs = [(n, int(b)) for b in args.batches.split(",") for n in args.norms.split(",")]
    configs += [("none", int(b)) for b in args.floor_batches.split(",") if b]
    configs += [("clade-ynnpack", int(b)) for b in args.ynnpack_batches.split(",") if b]
    results: dict = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as cache_dir:
        for r in range(args.rounds):
            for norm, batch in configs:
                res = run_child(
                    norm.split("-")[0],
                    batch,
                    args,
                    parts=r == 0,
                    # YNNPACK cells get their own compilation cache: the cache key does not
                    # include the backend flag, so a shared cache would hand them Eigen's code.
                    cache_dir=os.path.join(cache_dir, norm.replace("clade-", "")),
                    ynnpack=norm.endswith("-ynnpack"),
                )
                results[(norm, batch)].append(res)
                print(f"round {r} {norm} b{batch}: {json.dumps(res)}", flush=True)
    import jax

    med = lambda c, k: statistics.median(x[k] for x in results[c] if k in x)
    lines = [
        f"## training.py, {datetime.datetime.now():%Y-%m-%d %H:%M} (jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {args.size}x{args.size}, "
        f"{args.rounds} alternating rounds, one process per cell, {args.regions} label regions, "
        f"spade_windows={args.windows})",
        "",
        "| model | batch | step s (median) | images/s | G step | D step | D fwd+bwd | G regen "
        "| peak RSS GB | step temp GB | compile s cold / cached |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        first, later = results[c][0], results[c][1:]
        cached = f"{statistics.median(x['compile_s'] for x in later):.1f}" if later else "-"
        lines.append(
            f"| {c[0].upper()}{windows_note(first)} | {c[1]} | {med(c, 'step_s'):.2f} "
            f"| {c[1] / med(c, 'step_s'):.3f} "
            f"| {first['g_step_s']:.2f} | {first['d_step_s']:.2f} | {first['d_fwd_bwd_s']:.2f} "
            f"| {first['g_regen_s']:.2f} | {max(x['peak_rss_gb'] for x in results[c]):.2f} "
            f"| {first['temp_gb']:.2f} | {first['compile_s']:.1f} / {cached} |"
        )
    lines.append("")
    for b in sorted({c[1] for c in configs}):
        if ("clade", b) in results and ("spade", b) in results:
            lines.append(
                f"* batch {b}: CLADE / SPADE step time "
                f"{med(('clade', b), 'step_s') / med(('spade', b), 'step_s'):.3f}"
            )
        if ("clade", b) in results and ("none", b) in results:
            lines.append(
                f"* batch {b}: CLADE / floor (norm=none) step time "
                f"{med(('clade', b), 'step_s') / med(('none', b), 'step_s'):.3f}"
            )
        if ("clade", b) in results and ("clade-ynnpack", b) in results:
            lines.append(
                f"* batch {b}: CLADE step time Eigen / YNNPACK convolutions "
                f"{med(('clade', b), 'step_s') / med(('clade-ynnpack', b), 'step_s'):.3f}"
            )
    results_md.report("\n".join(lines) + "\n", append=not args.no_results)


if __name__ == "__main__":
    from clade_jax.backend import configure_cpu_backend

    configure_cpu_backend()
    main()
