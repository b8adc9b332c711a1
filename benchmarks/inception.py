"""pytorch-fid's Inception on this CPU: its speed per block against the machine's matrix product.

    python benchmarks/inception.py [--batch 8] [--size 256] [--rounds 5] [--no_append]

The evaluation is bound by Inception (`clade_jax.evaluation.fid.InceptionV3`: ~11 GFLOP per
image at 299x299, run on the synthesized and, until their statistics are cached, the real images),
whose work is fixed by the FID definition. This prints, measured in one process:

* the float32 rate of a jitted 2048 x 2048 x 2048 matrix product (`jnp.dot`), timed before and
  after the network (the two are averaged), the ceiling of XLA:CPU's convolutions on this machine;
* each stage of Inception (stem, the Mixed blocks) jitted on its own at its real input shape:
  milliseconds, GFLOP (XLA's cost analysis of the compiled stage) and GFLOP/s, and that rate as a
  fraction of the matrix product's;
* the whole `fid.InceptionFeatures` call (uint8 `--size` images, resize to 299 included):
  milliseconds per image, and `bound` = (its time) / (its GFLOP at the matrix-product rate), the
  most that any convolution algorithm of equal arithmetic could gain.

Times are minima over `--rounds` calls after one warm-up; the entry points' XLA:CPU flags
(`clade_jax.backend.configure_cpu_backend`). Needs the FID weights (`make weights`). Appends a
dated block to benchmarks/RESULTS.md (not with `--no_append`). Timing needs a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import results as results_md  # noqa: E402  (benchmarks/results.py)

from clade_jax import backend  # noqa: E402

backend.configure_cpu_backend()  # before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from clade_jax import weights as pretrained  # noqa: E402
from clade_jax.evaluation import fid  # noqa: E402


def best_time(fn, *args, rounds: int) -> float:
    """Minimum wall time of `fn(*args)` over `rounds` calls after one warm-up (compile)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def compiled_flops(fn, *args) -> float:
    """XLA's floating-point operation count of the compiled `fn(*args)`."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def matmul_rate(rounds: int, n: int = 2048) -> float:
    """GFLOP/s of a jitted float32 n x n x n product."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32)
    b = jax.random.normal(key_b, (n, n), jnp.float32)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    return 2 * n**3 / best_time(dot, a, b, rounds=rounds) / 1e9


def stages(model: fid.InceptionV3) -> list[tuple[str, object, tuple[int, int]]]:
    """(name, fn, (input size, input channels)) of the network's stages, in order."""
    m = model

    def stem1(x):  # (N, 299, 299, 3) -> (N, 147, 147, 64)
        return m.Conv2d_2b_3x3(m.Conv2d_2a_3x3(m.Conv2d_1a_3x3(x)))

    def stem2(x):  # (N, 147, 147, 64) -> (N, 35, 35, 192)
        x = m.Conv2d_4a_3x3(m.Conv2d_3b_1x1(fid._max_pool(x, 2, 0)))
        return fid._max_pool(x, 2, 0)

    return [
        ("stem 1a-2b", stem1, (299, 3)),
        ("stem 3b-4a", stem2, (147, 64)),
        ("Mixed_5b", m.Mixed_5b, (35, 192)),
        ("Mixed_5c", m.Mixed_5c, (35, 256)),
        ("Mixed_5d", m.Mixed_5d, (35, 288)),
        ("Mixed_6a", m.Mixed_6a, (35, 288)),
        ("Mixed_6b", m.Mixed_6b, (17, 768)),
        ("Mixed_6c", m.Mixed_6c, (17, 768)),
        ("Mixed_6d", m.Mixed_6d, (17, 768)),
        ("Mixed_6e", m.Mixed_6e, (17, 768)),
        ("Mixed_7a", m.Mixed_7a, (17, 768)),
        ("Mixed_7b", m.Mixed_7b, (8, 1280)),
        ("Mixed_7c", m.Mixed_7c, (8, 2048)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="input images' side (uint8)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no_append", action="store_true")
    args = parser.parse_args()
    b, rounds = args.batch, args.rounds
    load0 = os.getloadavg()

    peak_before = matmul_rate(rounds)
    state = pretrained.load_inception_state(pretrained.inception_path())
    model = nnx.eval_shape(lambda: fid.InceptionV3(rngs=nnx.Rngs(0)))
    fid.load_pytorch_fid_state(model, state)
    extractor = fid.InceptionFeatures(state, batch_size=b)
    images = np.random.default_rng(0).integers(0, 256, (b, args.size, args.size, 3), np.uint8)
    whole_s = best_time(extractor, images, rounds=rounds)
    graphdef, params = nnx.split(model)
    whole_flops = compiled_flops(
        lambda p, x: nnx.merge(graphdef, p)(fid.preprocess(x)), params, jnp.asarray(images)
    )
    rows = []
    rng = np.random.default_rng(1)
    for name, fn, (side, channels) in stages(model):
        x = jnp.asarray(rng.normal(size=(b, side, side, channels)).astype(np.float32))
        seconds = best_time(jax.jit(fn), x, rounds=rounds)
        rows.append((name, seconds, compiled_flops(fn, x)))
    peak = (peak_before + matmul_rate(rounds)) / 2

    stage_s = sum(r[1] for r in rows)
    stage_flops = sum(r[2] for r in rows)
    now = datetime.datetime.now().isoformat(timespec="minutes")
    lines = [
        f"### Inception against the matrix product ({now})",
        "",
        textwrap.fill(
            f"`python benchmarks/inception.py --batch {b} --size {args.size} --rounds {rounds}`: "
            f"minima over {rounds} calls; jitted float32 2048^3 product {peak:.0f} GFLOP/s "
            f"({peak_before:.0f} before the network). Load average {load0[0]:.2f} at start, "
            f"{os.getloadavg()[0]:.2f} at end.",
            100,
        ),
        "",
        f"| stage (batch {b}) | ms | GFLOP | GFLOP/s | of the product's rate |",
        "|---|---|---|---|---|",
    ]
    for name, seconds, flops in rows:
        rate = flops / seconds / 1e9
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} | {flops / 1e9:.2f} | {rate:.0f} | {rate / peak:.2f} |"
        )
    stage_rate = stage_flops / stage_s / 1e9
    whole_rate = whole_flops / whole_s / 1e9
    lines += [
        f"| all stages | {stage_s * 1e3:.1f} | {stage_flops / 1e9:.2f} | {stage_rate:.0f} "
        f"| {stage_rate / peak:.2f} |",
        f"| whole `InceptionFeatures` ({args.size}x{args.size} uint8) | {whole_s * 1e3:.1f} "
        f"| {whole_flops / 1e9:.2f} | {whole_rate:.0f} | {whole_rate / peak:.2f} |",
        "",
        textwrap.fill(
            f"Per image: {whole_s / b * 1e3:.1f} ms ({whole_flops / b / 1e9:.2f} GFLOP); at the "
            f"matrix product's rate {whole_flops / b / peak / 1e6:.1f} ms: bound "
            f"{peak / whole_rate:.2f}x for any convolution algorithm of equal arithmetic.",
            100,
        ),
    ]
    results_md.report("\n".join(lines) + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
