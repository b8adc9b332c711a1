"""Training throughput: the jit-compiled GAN step for CLADE vs SPADE, and the input pipeline alone.

    python benchmarks/training.py [--rounds 3] [--batch 1] [--size 256] [--pipeline_batches 20]

* Step: the full-size ADE20k networks (151 classes, ngf 64, ndf 64, two discriminator scales,
  no VGG), one G update + one D update per step (`clade_jax.training.step.train_step`), batch
  `--batch` at `--size`^2, random label maps, state donated. CLADE and SPADE are timed in
  alternating rounds in one process; the median of the rounds is reported, with the ratio.
* Pipeline: `make_train_iterator` on the synthetic scenes rendered at 286 and augmented as ADE20k
  (resize-and-crop 286 -> 256 + flip), images/s with this process's threads. The pipeline must
  deliver at least 3x what the (faster) step consumes.

Appends a dated block to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from clade_jax.configs import ade20k, synthetic  # noqa: E402
from clade_jax.data import make_train_iterator  # noqa: E402
from clade_jax.training.state import GANState  # noqa: E402
from clade_jax.training.step import train_step  # noqa: E402


def make_step(norm: str, batch: int, size: int):
    config = ade20k.get_config(f"norm={norm}")
    config.loss.lambda_vgg = 0.0
    config.data.crop_size = size
    model = GANState(config, 1000, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    graphdef, state = nnx.split(model)
    fn = jax.jit(
        functools.partial(train_step, graphdef, loss_cfg=config.loss, ema_decay=0.0),
        donate_argnums=(0,),
    )
    rng = np.random.default_rng(0)
    data = {
        "label": jnp.asarray(rng.integers(0, 151, (batch, size, size)), jnp.int32),
        "image": jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32),
    }
    holder = {"state": state, "step": 0}

    def run():
        holder["state"], metrics = fn(
            holder["state"], data, jnp.int32(holder["step"]), jax.random.key(0), None
        )
        holder["step"] += 1
        jax.block_until_ready(metrics)

    return run


def time_it(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def pipeline_images_per_second(num_batches: int, batch: int) -> float:
    config = synthetic.get_config()
    config.data.synthetic_resolution = 286
    config.data.load_size = 286
    config.data.crop_size = 256
    config.data.num_workers = 0
    it = make_train_iterator(config.data, global_batch_size=batch, process_index=0, process_count=1)
    next(it)  # start-up
    t = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return num_batches * batch / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--pipeline_batches", type=int, default=20)
    args = p.parse_args()

    steps = {n: make_step(n, args.batch, args.size) for n in ("clade", "spade")}
    for run in steps.values():  # compile + one warm-up step
        run()
        run()
    times = {n: [] for n in steps}
    for _ in range(args.rounds):
        for n, run in steps.items():
            times[n].append(time_it(run))
    med = {n: statistics.median(v) for n, v in times.items()}
    pipe = pipeline_images_per_second(args.pipeline_batches, 16)
    consumed = args.batch / min(med.values())
    load = os.getloadavg()[0]
    lines = [
        f"## training.py, {datetime.date.today()} (jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, load average {load:.1f})",
        "",
        f"Full-size ADE20k GAN step (G + D update), batch {args.batch}, {args.size}x{args.size}, "
        f"median of {args.rounds} alternating rounds:",
        "",
        "| model | s/step | steps/s | images/s |",
        "|---|---|---|---|",
    ]
    for n in steps:
        lines.append(
            f"| {n.upper()} | {med[n]:.2f} | {1 / med[n]:.3f} | {args.batch / med[n]:.3f} |"
        )
    lines += [
        "",
        f"CLADE / SPADE step time: **{med['clade'] / med['spade']:.2f}**",
        "",
        f"Input pipeline alone (synthetic scenes, 286 -> crop 256 + flip, 0 workers): "
        f"{pipe:.1f} images/s = **{pipe / consumed:.0f}x** what the faster step consumes.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(REPO, "benchmarks", "RESULTS.md"), "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    from clade_jax.backend import configure_cpu_backend

    configure_cpu_backend()
    main()
