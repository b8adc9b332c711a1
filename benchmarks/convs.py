"""Every convolution of the GAN step, timed alone: forward, input gradient, weight gradient.

    python benchmarks/convs.py [--batch 1] [--size 256] [--norms clade,spade] [--repeats 3]

The convolutions are those of the full-size ADE20k generator (CLADE and / or SPADE) and the
multiscale discriminator at `--batch` images of `--size`^2 (the discriminator sees 2 x batch:
[fake; real]), captured by tracing one forward of each network. For each distinct convolution
it times, in one process and alternating: the forward; the input gradient, XLA's own and the
other form ("dx fast": for stride 1 `taps_input_grad`, one matrix product per kernel tap; for
larger strides `phases_input_grad`, one stride-1 convolution per output phase); XLA's own weight
gradient, `clade_jax.layers.conv.taps_weight_grad` (the tap-wise matrix-product form) and, for
stride 1, `rows_weight_grad` (one matrix product per kernel row, the output gradient shifted)
and `patches_weight_grad` (a loop of im2col blocks, each one matrix product). It reports the
ratios to XLA and which forms `weight_grad_formulation` and `input_grad_formulation` (the rules
that `conv2d(weight_grad="auto")` uses on CPU) pick for that shape. The convolutions of one-hot
label maps (SPADE's shared conv, the discriminator's first layer, the generators' `fc`) are timed
apart: the one-hot convolution vs `onehot_conv`'s tap-wise gather (what the layers use on CPU),
forward and weight gradient. Appends a dated block to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from clade_jax import backend  # noqa: E402

backend.configure_cpu_backend()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from clade_jax.configs import ade20k  # noqa: E402
from clade_jax.layers import conv as conv_lib  # noqa: E402
from clade_jax.models.build import build_discriminator, build_generator  # noqa: E402
from clade_jax.training import runtime  # noqa: E402


def capture_shapes(norms: list[str], batch: int, size: int) -> dict:
    """{(x_shape, w_shape, stride, padding): [where, ...]} for one G and D forward."""
    shapes: dict = {}
    original = conv_lib.conv2d

    def recorder(x, w, *, stride=1, padding=0, weight_grad="auto"):
        key = (tuple(x.shape), tuple(w.shape), stride, padding)
        shapes.setdefault(key, set()).add(recorder.where)
        return original(x, w, stride=stride, padding=padding, weight_grad=weight_grad)

    original_onehot = conv_lib.onehot_conv

    def onehot_recorder(labels, w, *, stride=1, padding=0, invalid="zero", method="auto"):
        key = ("onehot", tuple(labels.shape), tuple(w.shape), stride, padding)
        shapes.setdefault(key, set()).add(recorder.where)
        return original_onehot(
            labels, w, stride=stride, padding=padding, invalid=invalid, method=method
        )

    conv_lib.conv2d = recorder
    conv_lib.onehot_conv = onehot_recorder
    try:
        for norm in norms:
            config = ade20k.get_config(f"norm={norm}")
            config.data.crop_size = size
            rngs = nnx.Rngs(runtime.init_key(0))
            g = build_generator(config, rngs=rngs)
            labels = jnp.zeros((batch, size, size), jnp.int32)
            recorder.where = f"G {norm}"
            jax.eval_shape(lambda gd, st, lab: nnx.merge(gd, st)(lab), *nnx.split(g), labels)
        d = build_discriminator(config, rngs=rngs)
        recorder.where = "D"
        image = jnp.zeros((2 * batch, size, size, 3), jnp.float32)
        labels = jnp.zeros((2 * batch, size, size), jnp.int32)
        jax.eval_shape(
            lambda gd, st, lab, im: nnx.merge(gd, st)(lab, im), *nnx.split(d), labels, image
        )
    finally:
        conv_lib.conv2d = original
        conv_lib.onehot_conv = original_onehot
    return shapes


def time_fn(fn, args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_shape(x_shape, w_shape, stride, padding, repeats, rng):
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape) * 0.02, jnp.float32)
    conv = conv_lib._plain_conv  # noqa: SLF001
    y = jax.eval_shape(lambda a, b: conv(a, b, stride, padding), x, w)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    fns = {
        "fwd": jax.jit(lambda a, b: conv(a, b, stride, padding)),
        "dx": jax.jit(lambda a, b, gy: jax.vjp(lambda a_: conv(a_, b, stride, padding), a)[1](gy)),
        "dw_xla": jax.jit(
            lambda a, b, gy: jax.vjp(lambda b_: conv(a, b_, stride, padding), b)[1](gy)[0]
        ),
        "dw_taps": jax.jit(
            lambda a, b, gy: conv_lib.taps_weight_grad(a, gy, b.shape[0], stride, padding)
        ),
    }
    if stride == 1 and 0 <= padding < w_shape[0]:  # the other input-gradient form
        fns["dx_fast"] = jax.jit(lambda a, b, gy: conv_lib.taps_input_grad(gy, b, padding))
    elif stride >= 2 and w_shape[0] >= stride:
        fns["dx_fast"] = jax.jit(
            lambda a, b, gy: conv_lib.phases_input_grad(gy, b, stride, padding, a.shape[1:3])
        )
    if stride == 1 and w_shape[0] > 1:
        fns["dw_rows"] = jax.jit(
            lambda a, b, gy: conv_lib.rows_weight_grad(a, gy, b.shape[0], padding)
        )
        fns["dw_patches"] = jax.jit(
            lambda a, b, gy: conv_lib.patches_weight_grad(a, gy, b.shape[0], padding)
        )
    args = {k: (x, w) if k == "fwd" else (x, w, g) for k in fns}
    ref = fns["dw_xla"](x, w, g)
    err = max(
        float(jnp.linalg.norm(fns[k](x, w, g) - ref) / jnp.linalg.norm(ref))
        for k in fns
        if k.startswith("dw_")
    )
    if "dx_fast" in fns:  # the tap-wise / phase-wise input gradient against XLA's
        ref_dx = fns["dx"](x, w, g)[0]
        dx_err = float(jnp.linalg.norm(fns["dx_fast"](x, w, g) - ref_dx) / jnp.linalg.norm(ref_dx))
        err = max(err, dx_err)
    return {k: time_fn(f, args[k], repeats) for k, f in fns.items()}, err


def bench_onehot(l_shape, w_shape, stride, padding, repeats, rng):
    """Forward and weight gradient of a one-hot convolution: the conv vs the tap-wise gather."""
    labels = jnp.asarray(rng.integers(0, w_shape[2], l_shape), jnp.int32)
    w = jnp.asarray(rng.standard_normal(w_shape) * 0.02, jnp.float32)
    out = {}
    for method in ("conv", "gather"):
        # labels and the output gradient are arguments: as constants XLA would fold the weight
        # gradient (linear in them, independent of w) at compile time.
        f = lambda w_, lab, m=method: conv_lib.onehot_conv(
            lab, w_, stride=stride, padding=padding, method=m
        )
        y = jax.eval_shape(f, w, labels)
        g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        fwd = jax.jit(f)
        dw = jax.jit(lambda w_, lab, gy, f=f: jax.vjp(lambda v: f(v, lab), w_)[1](gy)[0])
        out[method] = (time_fn(fwd, (w, labels), repeats), time_fn(dw, (w, labels, g), repeats))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--norms", default="clade,spade")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_results", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    shapes = capture_shapes(args.norms.split(","), args.batch, args.size)
    rng = np.random.default_rng(0)
    header = (
        f"{'x shape':>20} {'kernel':>18} s p | {'fwd':>8} {'dx':>8} {'dx fast':>8} dx auto "
        f"{'dw xla':>9} "
        f"{'dw taps':>8} {'dw rows':>8} {'dw patch':>8} {'taps/xla':>8} {'rows/xla':>8} "
        f"{'ptch/xla':>8} auto    rel.err  where"
    )
    lines = [header]
    print(header, flush=True)
    total = {"xla": 0.0, "auto": 0.0, "dx_xla": 0.0, "dx_auto": 0.0}
    onehot = {k: v for k, v in shapes.items() if k[0] == "onehot"}
    shapes = {k: v for k, v in shapes.items() if k[0] != "onehot"}
    for (xs, ws, s, p), where in sorted(shapes.items(), key=lambda kv: -np.prod(kv[0][0])):
        t, err = bench_shape(xs, ws, s, p, args.repeats, rng)
        auto = conv_lib.weight_grad_formulation(xs, ws, s)
        total["xla"] += t["dw_xla"]
        total["auto"] += t["dw_" + auto]
        rows, patches, dx_fast = t.get("dw_rows"), t.get("dw_patches"), t.get("dx_fast")
        dx_auto = conv_lib.input_grad_formulation(xs, ws, s, p)
        total["dx_xla"] += t["dx"]
        total["dx_auto"] += t["dx"] if dx_auto == "xla" else dx_fast
        line = (
            f"{str(xs):>20} {str(ws):>18} {s} {p} | {t['fwd'] * 1e3:7.1f}m {t['dx'] * 1e3:7.1f}m "
            + (f"{dx_fast * 1e3:7.1f}m " if dx_fast else f"{'-':>8} ")
            + f"{dx_auto:7} {t['dw_xla'] * 1e3:8.1f}m {t['dw_taps'] * 1e3:7.1f}m "
            + (f"{rows * 1e3:7.1f}m " if rows else f"{'-':>8} ")
            + (f"{patches * 1e3:7.1f}m " if patches else f"{'-':>8} ")
            + f"{t['dw_taps'] / t['dw_xla']:8.3f} "
            + (f"{rows / t['dw_xla']:8.3f} " if rows else f"{'-':>8} ")
            + (f"{patches / t['dw_xla']:8.3f} " if patches else f"{'-':>8} ")
            + f"{auto:7} {err:8.1e}  {', '.join(sorted(where))}"
        )
        lines.append(line)
        print(line, flush=True)
    oh_header = (
        f"one-hot convolutions: {'labels':>16} {'kernel':>18} s p | conv fwd / dW | "
        "gather fwd / dW | ratios"
    )
    lines.append(oh_header)
    print(oh_header, flush=True)
    for (_, ls, ws, s, p), where in sorted(onehot.items(), key=lambda kv: -np.prod(kv[0][1])):
        t = bench_onehot(ls, ws, s, p, args.repeats, rng)
        (cf, cd), (gf, gd) = t["conv"], t["gather"]
        line = (
            f"{str(ls):>38} {str(ws):>18} {s} {p} | {cf * 1e3:7.1f}m {cd * 1e3:7.1f}m | "
            f"{gf * 1e3:7.1f}m {gd * 1e3:7.1f}m | {gf / cf:.3f} {gd / cd:.3f}  "
            f"{', '.join(sorted(where))}"
        )
        lines.append(line)
        print(line, flush=True)
    summary = (
        f"sum of distinct weight gradients: XLA {total['xla']:.2f} s, auto rule "
        f"{total['auto']:.2f} s (ratio {total['auto'] / total['xla']:.3f}); input gradients: XLA "
        f"{total['dx_xla']:.2f} s, auto rule {total['dx_auto']:.2f} s "
        f"(ratio {total['dx_auto'] / total['dx_xla']:.3f})"
    )
    print(summary)
    if not args.no_results:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with open(os.path.join(REPO, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(
                f"\n## convs.py {stamp} (batch {args.batch}, {args.size}^2, {args.norms}, "
                f"median of {args.repeats}, backend {jax.default_backend()}, "
                f"load {os.getloadavg()[0]:.1f})\n\n```\n"
            )
            f.write("\n".join(lines) + f"\n{summary}\n```\n")


if __name__ == "__main__":
    main()
