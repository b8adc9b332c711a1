"""Convolution and linear layers with the official initialisation and optional spectral norm.

`Conv2d` is a 2-D NHWC convolution with PyTorch's symmetric zero padding and, with
`spectral_norm=True`, the semantics of `torch.nn.utils.spectral_norm`:

* the kernel parameter is the un-normalized weight (`weight_orig` in PyTorch);
* the weight matrix is the kernel reshaped PyTorch's way, `(out, in * kh * kw)`, so the stored
  vectors `u` (out,) and `v` (in * kh * kw,) are interchangeable with the official ones;
* a training forward runs one power iteration (`v = normalize(W^T u)`, `u = normalize(W v)`,
  eps 1e-12), stores u and v, and divides by `sigma = u . W v` (gradients flow through W only);
* an evaluation forward (`use_running_average=True`, set by `model.eval()`) uses the stored u
  and v as they are.

`u` and `v` are `SpectralVector` variables (a kind of `nnx.BatchStat`), not parameters.

`fold_spectral_norm` copies an evaluation-mode module with its spectral-normalized kernels made
plain ones (`W / sigma`, computed once from the stored vectors): the same numbers without
recomputing sigma and rescaling every kernel on every call (benchmarks/RESULTS.md has the time
saved). Inference (`clade_jax.synthesize`, the runtime column) folds.

Initialisation is the official `init_weights('xavier', 0.02)`: xavier-normal weights with gain 0.02
and zero biases.

Weight gradients on XLA:CPU (`conv2d`). XLA:CPU lowers the filter gradient of some convolutions
to a very slow loop nest: the discriminator's stride-1 kernel-4 256 -> 512 convolutions took
8-21 s for their weight gradient at batch 2 (33x33 output) against ~0.1 s for the same
arithmetic as a matrix product (benchmarks/convs.py, benchmarks/RESULTS.md). `conv2d` therefore
has a `jax.custom_vjp` whose backward forms the weight gradient from the kernel taps: for each
tap (i, j) the strided slice of the padded input, all taps stacked, contracted with the output
gradient in one `dot_general`, `dW[i, j] = sum_{n,y,x} x_pad[n, s*y+i, s*x+j, :]^T g[n, y, x, :]`,
which is the same sum in real arithmetic (float rounding differs, ~1e-6 relative). The forward
is XLA's own, and so is the input gradient except where the tap-wise or phase-wise forms below
measured faster (`input_grad_formulation`). `weight_grad="auto"` (the default) takes this path only
on the CPU backend and only for the shapes where it measured faster (`taps_weight_grad_wins`);
on GPU / TPU every convolution is the plain `lax.conv_general_dilated` and its ordinary
autodiff. `"xla"` and `"taps"` force one or the other (tests check both give the same gradients).

Memory on XLA:CPU. The input gradient of a convolution needs the kernel reversed and transposed;
XLA:CPU forms those copies as soon as the parameters exist, at the start of the step, and holds
all of them until the backward pass reaches their layer (389 MB of the full-size CLADE step's
1.23 GB of temporaries at batch 1: `compiled.memory_analysis()`, buffer assignment read from
`--xla_dump_to`). On CPU every `conv2d` with `weight_grad="auto"` and a kernel of at least 1 MiB
or an input of at least 4 MiB (`LATE_KERNEL_BYTES`, `LATE_INPUT_BYTES`: below both it only costs
compile time) therefore goes through the same `custom_vjp`, whose backward ties the kernel to
the output gradient first (`after`), so each copy is made when its layer's gradient arrives and
freed after; the weight gradient is XLA's own or the taps one, as above. `onehot_conv`'s gather
loop and CLADE's backward (`clade._modulate_late_gathers`) avoid the same early-and-held pattern
for gathered rows; with all three the step's temporaries were 0.78 GB (from 1.23) and the
process's peak 2.40 GB (from 2.92; benchmarks/training.py), 0.92 GB / 2.4-2.6 GB with the row-shift
weight gradient below. The same backward makes each weight gradient follow its input gradient
(`after`), so that the optimizer can update the donated kernel in place instead of XLA keeping a
copy of it for the whole step; with XLA:CPU's memory-minimizing scheduler (`clade_jax.backend`)
the step's temporaries are 0.67 GB (CLADE) and 0.96 GB (SPADE, with its recomputed shared
activation, `clade_jax.layers.spade`).

Row-shift weight gradient (`rows_weight_grad`, stride 1): the generator's layers on 64x64 and
larger grids, where XLA:CPU's filter gradient took 2.5-8x their forward time, form it as one
matrix product per kernel row: the output gradient shifted along the width by each column tap
(zero-padded), side by side, against the contiguous row block of the padded input; 0.43-0.87x
XLA's time where the output is no wider than the input (`rows_weight_grad_wins`).

Im2col-block weight gradient (`patches_weight_grad`, stride 1): for the convolutions with at most
128 input channels on 64x64 and larger grids (SPADE's 128 -> C modulation convolutions, the
generator's 256x256 layers) the filter gradient is a loop over blocks of output rows, each one
matrix product of the block's im2col matrix (k*k*C wide, at most 4 MiB) with the same rows of the
output gradient: 0.46-0.83x XLA's time and 0.45-0.83x the row-shift form's there
(`patches_weight_grad_wins`). It also holds less: the full-size SPADE step's temporaries went
from 0.962 to 0.769 GB at batch 1 (the row-shift form's k shifted output gradients are gone).

Tap-wise input gradient (`taps_input_grad`, stride 1): XLA:CPU's input gradient is the
convolution of the output gradient with the flipped kernel whose channel axes it swaps by a
(k, k, O, C) transpose, 60 ms for a 3x3 1024 -> 1024 kernel here, 6x the convolution itself on
an 8x8 grid. On small grids with wide kernels (the generators' 1024-channel layers at 8x8 and
16x16, pix2pixHD's residual blocks; `taps_input_grad_wins`) the CPU backward forms it instead
as `sum_taps W[i, j] @ g_tap^T`, the kernel's contiguous (C, O) tap blocks as they are:
0.16-0.51x XLA's time on those shapes. Full-size training step at batch 1, both programs in one
process with steps alternating (2026-12-03, 2-core Xeon): pix2pixHD 0.930 (12.62 -> 11.74 s),
CLADE 0.959 (3.70 -> 3.55 s), SPADE 0.993 (within the spread); temporaries unchanged.

Phase-wise input gradient (`phases_input_grad`, stride >= 2): XLA's input gradient of a strided
convolution convolves the output gradient dilated by the stride (zeros between its pixels), so
stride^2 times the arithmetic, mostly on zeros; each output phase (y mod s, x mod s) receives only
the taps `W[r::s, q::s]`, so the CPU backward forms it as s^2 stride-1 convolutions with those
sub-kernels, interleaved. 0.15-0.50x XLA's time for the discriminator's 4x4 stride-2 layers on
large inputs (`phases_input_grad_wins`); full-size training step, in one process, alternating
(2026-12-03, Xeon): CLADE b1 0.922 (3.44 -> 3.17 s), SPADE b1 0.942 (7.39 -> 6.96 s), CLADE b4
0.866 (15.63 -> 13.54 s).

Tried and not kept: Winograd F(2x2, 3x3) and F(4x4, 3x3) for the 3x3 stride-1 convolutions
(input / kernel / output transforms in XLA ops around one batched matrix product; backward by
autodiff, input gradient as the same transform of the flipped kernel). Exact in real arithmetic
(float32 error vs float64: F(2,3) 2e-7, F(4,3) 3e-6 of the output's max), but with XLA:CPU
fusing the transforms it was slower than the direct convolution, which already runs near this
CPU's peak (~170 GFLOP/s for 128 -> 128 at 256x256): forward 156 (F4) / 212 (F2) vs 114 ms
there, 204 / 153 vs 55 ms for 128 -> 64, a win only for 256 -> 256 at 64x64 (25 vs 30 ms).

Convolutions of a one-hot label map (`onehot_conv`, `Conv2d(x, labels=...)`): SPADE's shared
modulation conv, the discriminator's first layer and the generators' label-map input convs see
`one_hot(labels)` (151-183 channels, all but one zero per pixel). On CPU these are computed as
what they are, a sum over the kernel taps of rows gathered from the kernel,
`y[n, y, x] = sum_{i,j} W[i, j, labels[n, s*y+i-p, s*x+j-p], :]` (padding reads a zero row), and
their weight gradient is the matching scatter-add: the same nonzero terms as the convolution
(float rounding of the sum differs, ~1e-7 relative), without the one-hot tensor: 11x less
forward and 13x less weight-gradient time for SPADE's 256x256 layer, 50x / 74x for the
discriminator's first layer (benchmarks/convs.py in benchmarks/RESULTS.md). On GPU /
TPU `method="auto"` keeps the ordinary one-hot convolution.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx

XAVIER_GAIN = 0.02


class SpectralVector(nnx.BatchStat):
    """Power-iteration vector of a spectral-normalized layer (state, not a parameter)."""


def xavier_normal(gain: float = XAVIER_GAIN):
    """PyTorch's `xavier_normal_(gain)`: std = gain * sqrt(2 / (fan_in + fan_out))."""
    return jax.nn.initializers.variance_scaling(gain**2, "fan_avg", "normal")


_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
WEIGHT_GRAD_MODES = ("auto", "xla", "taps", "rows", "patches")
_PLAIN = [False]  # set by `plain_formulation()`


@contextlib.contextmanager
def plain_formulation():
    """While tracing inside this context, `weight_grad="auto"` and `method="auto"` take the
    plain convolution on every backend: the textbook program, e.g. for counting its
    convolutions' MACs with XLA's cost analysis (the complexity table) or for comparisons.
    It acts at trace time: jax caches traces per function, so trace a fresh function here."""
    _PLAIN[0], before = True, _PLAIN[0]
    try:
        yield
    finally:
        _PLAIN[0] = before


def cpu_fast_path() -> bool:
    """Whether the CPU-only formulations apply (CPU backend, outside `plain_formulation`)."""
    return not _PLAIN[0] and jax.default_backend() == "cpu"


def _plain_conv(x: jnp.ndarray, w: jnp.ndarray, stride: int, padding: int) -> jnp.ndarray:
    p = padding
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((p, p), (p, p)), dimension_numbers=_DIMENSIONS
    )


def taps_weight_grad(
    x: jnp.ndarray, g: jnp.ndarray, kernel_size: int, stride: int, padding: int
) -> jnp.ndarray:
    """The filter gradient of `_plain_conv` as one matrix product over the kernel taps.

    x: (N, H, W, C) input; g: (N, H', W', O) output gradient -> (k, k, C, O) in x's dtype
    (accumulated in float32).
    """
    k, s, p = kernel_size, stride, padding
    n, ho, wo, o = g.shape
    c = x.shape[3]
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    taps = [
        jax.lax.slice(
            xp, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c), (1, s, s, 1)
        )
        for i in range(k)
        for j in range(k)
    ]
    cols = jnp.stack(taps).reshape(k * k, n * ho * wo, c)  # (k*k, M, C)
    dw = jnp.einsum(
        "tmc,mo->tco", cols, g.reshape(n * ho * wo, o), preferred_element_type=jnp.float32
    )
    return dw.reshape(k, k, c, o).astype(x.dtype)


def rows_weight_grad(x: jnp.ndarray, g: jnp.ndarray, kernel_size: int, padding: int) -> jnp.ndarray:
    """The filter gradient of a stride-1 `_plain_conv` as k matrix products over kernel rows.

    `dW[i, j] = sum_{n,y,x} x_pad[n, y+i, x+j, :]^T g[n, y, x, :]`. Shifting g instead of x by
    j along the width (zero-padded to the padded input's width Wp) makes the input operand of
    kernel row i the contiguous row block `x_pad[:, i:i+H']`, and the k column shifts of g side
    by side, (N, H', Wp, k*O), make one product per kernel row:
    `dW[i] = x_rows_i^T (N*H'*Wp, C) @ g_shifts (N*H'*Wp, k*O)`. No im2col copy of the input;
    (Wp / W') times the arithmetic of the convolution.

    x: (N, H, W, C); g: (N, H', W', O) -> (k, k, C, O) in x's dtype (accumulated in float32).
    """
    k, p = kernel_size, padding
    n, ho, wo, o = g.shape
    c = x.shape[3]
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    wp = xp.shape[2]
    # g shifted right by j (zeros elsewhere) for each j, stacked on the channel axis
    shifts = jnp.concatenate(
        [jnp.pad(g, ((0, 0), (0, 0), (j, wp - wo - j), (0, 0))) for j in range(k)], axis=3
    ).reshape(n * ho * wp, k * o)
    rows = []
    for i in range(k):
        # row i's input block is cut only after row i - 1's product (`after`): one block of
        # the input's size alive at a time, not k (this runs where activation memory peaks)
        src = xp if not rows else after(xp, rows[-1])
        xi = jax.lax.slice_in_dim(src, i, i + ho, axis=1).reshape(n * ho * wp, c)
        dwi = jnp.einsum("mc,mq->cq", xi, shifts, preferred_element_type=jnp.float32)
        rows.append(jnp.transpose(dwi.reshape(c, k, o), (1, 0, 2)))  # (k, C, O): taps j
    return jnp.stack(rows).astype(x.dtype)


# Elements of one im2col block of `patches_weight_grad` (4 MiB of float32): the row chunk is the
# largest that keeps its block within this. Measured on the full-size generators' shapes
# (benchmarks/convs.py): blocks of 0.5-1k output pixels x 9 * 128 taps-channels (128 channels)
# or 1k x 9 * 64 ran fastest; blocks of 8k pixels were 1.35-1.9x slower.
PATCHES_BLOCK_ELEMENTS = 1 << 20


def patches_weight_grad(
    x: jnp.ndarray, g: jnp.ndarray, kernel_size: int, padding: int
) -> jnp.ndarray:
    """The filter gradient of a stride-1 `_plain_conv` as im2col blocks times output gradients.

    `dW = sum_blocks cols_b^T (M_b, k*k*C) @ g_b (M_b, O)` where block b is a chunk of output
    rows (all images), `cols_b` its im2col matrix (the k*k shifted windows of the padded input,
    side by side on the channel axis) and `g_b` the same rows of the output gradient: the same
    sum as the convolution's filter gradient in real arithmetic, as one wide matrix product per
    block (a `fori_loop`, so one block of at most `PATCHES_BLOCK_ELEMENTS` is alive at a time).

    x: (N, H, W, C); g: (N, H', W', O) -> (k, k, C, O) in x's dtype (accumulated in float32).
    """
    k, p = kernel_size, padding
    n, ho, wo, o = g.shape
    c = x.shape[3]
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))  # (N, H' + k - 1, W' + k - 1, C)
    per_row = n * wo * k * k * c
    rows = max(
        r
        for r in range(1, ho + 1)
        if ho % r == 0 and (r == 1 or r * per_row <= PATCHES_BLOCK_ELEMENTS)
    )

    def block(b, acc):
        r0 = b * rows
        xs = jax.lax.dynamic_slice_in_dim(xp, r0, rows + k - 1, axis=1)
        cols = jnp.concatenate(
            [xs[:, i : i + rows, j : j + wo, :] for i in range(k) for j in range(k)], axis=-1
        ).reshape(n * rows * wo, k * k * c)  # (M_b, k*k*C), taps (i, j) major
        gb = jax.lax.dynamic_slice_in_dim(g, r0, rows, axis=1).reshape(n * rows * wo, o)
        return acc + jnp.einsum("mq,mo->qo", cols, gb, preferred_element_type=jnp.float32)

    dw = jax.lax.fori_loop(0, ho // rows, block, jnp.zeros((k * k * c, o), jnp.float32))
    return dw.reshape(k, k, c, o).astype(x.dtype)


def taps_input_grad(g: jnp.ndarray, w: jnp.ndarray, padding: int) -> jnp.ndarray:
    """The input gradient of a stride-1 `_plain_conv` as one matrix product per kernel tap.

    `dx[n, y, x] = sum_{i,j} g_pad[n, y + k-1-i, x + k-1-j, :] @ W[i, j]^T` with g zero-padded
    by k-1-p: XLA's own form is the same convolution of g with the kernel flipped and its
    channel axes swapped, and XLA:CPU forms that swapped kernel as a (k, k, O, C) transpose
    (60 ms for a 3x3 1024 -> 1024 kernel on a 2-core Xeon, 6x the convolution itself at 8x8).
    Here each tap's `W[i, j]` (C, O), contiguous in the HWIO kernel, is the left operand of
    `W[i, j] @ g_tap^T` (C, N*H*W): no kernel copy, the small operand transposed instead; the
    taps' products are summed (float32) and the (C, N*H*W) result is transposed back. The same
    sum as the convolution's input gradient in real arithmetic (float rounding differs, ~5e-7
    relative); it pays on small grids with wide kernels (`taps_input_grad_wins`).

    g: (N, H', W', O) output gradient; w: (k, k, C, O) -> (N, H, W, C) in g's dtype with
    H = H' - k + 1 + 2p (needs 0 <= p <= k - 1).
    """
    k, _, c, o = w.shape
    q = k - 1 - padding
    if not 0 <= q <= k - 1:
        raise ValueError(f"taps_input_grad needs 0 <= padding <= {k - 1}, got {padding}")
    n, ho, wo, _ = g.shape
    gp = jnp.pad(g, ((0, 0), (q, q), (q, q), (0, 0)))
    h, wd = ho + 2 * q - k + 1, wo + 2 * q - k + 1  # the input's grid
    acc = None
    for i in range(k):
        for j in range(k):
            tap = gp[:, k - 1 - i : k - 1 - i + h, k - 1 - j : k - 1 - j + wd, :]
            term = jax.lax.dot_general(
                w[i, j],
                tap.reshape(n * h * wd, o),
                (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )  # (C, N*H*W)
            acc = term if acc is None else acc + term
    return acc.T.reshape(n, h, wd, c).astype(g.dtype)


def after(value: jnp.ndarray, anchor: jnp.ndarray) -> jnp.ndarray:
    """`value`, computed only once `anchor` is: the same numbers, with a data dependency.

    XLA's scheduler may run work that depends only on parameters (a kernel's transposed copy for
    the input gradient, rows gathered from a table) at the start of the program and keep the
    result alive until the backward pass uses it; on XLA:CPU `optimization_barrier` does not
    stop this. Adding `0 * isnan(anchor[0])` ties the value to the anchor (e.g. the backward's
    cotangent), so it is formed when needed and freed after: a term that is exactly zero for any
    anchor, NaN and inf included, and that XLA does not fold away (tested on the compiled HLO).
    """
    flag = jax.lax.stop_gradient(jnp.isnan(anchor.reshape(-1)[0])).astype(value.dtype)
    return value + jnp.zeros((), value.dtype) * flag


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_cpu(x, w, stride, padding, weight_grad):
    return _plain_conv(x, w, stride, padding)


def _conv_cpu_fwd(x, w, stride, padding, weight_grad):
    return _plain_conv(x, w, stride, padding), (x, w)


def _conv_cpu_bwd(stride, padding, weight_grad, residuals, g):
    x, w = residuals
    # The kernel enters the input gradient only once g exists (`after`): XLA:CPU otherwise
    # forms every layer's transposed kernel at the start of the step and holds them all (389 MB
    # of the full-size CLADE step's 1.23 GB of temporaries, batch 1).
    w_late = after(w, g)
    dx_formulation = input_grad_formulation(x.shape, w.shape, stride, padding)
    if dx_formulation == "taps":
        dx = taps_input_grad(g, w_late, padding).astype(x.dtype)
    elif dx_formulation == "phases":
        dx = phases_input_grad(g, w_late, stride, padding, x.shape[1:3]).astype(x.dtype)
    else:
        _, input_vjp = jax.vjp(lambda x_: _plain_conv(x_, w_late, stride, padding), x)
        (dx,) = input_vjp(g)
    if weight_grad == "taps":
        dw = taps_weight_grad(x, g, w.shape[0], stride, padding).astype(w.dtype)
    elif weight_grad == "rows":
        dw = rows_weight_grad(x, g, w.shape[0], padding).astype(w.dtype)
    elif weight_grad == "patches":
        dw = patches_weight_grad(x, g, w.shape[0], padding).astype(w.dtype)
    else:
        _, weight_vjp = jax.vjp(lambda w_: _plain_conv(x, w_, stride, padding), w)
        (dw,) = weight_vjp(g)
    # The weight gradient, and with it the optimizer's in-place update of the donated kernel,
    # follows the input gradient's read of the kernel (`after`): XLA proves a parameter dead
    # from data dependencies only, and the read that propagates the gradient to the layers below
    # is no ancestor of the layer's own update, so XLA kept a copy of every such kernel from the
    # start of the step to its update (281 copies, 387 MB of the full-size SPADE step's
    # temporaries, batch 1). With the memory-minimizing scheduler (`clade_jax.backend`) this
    # took the step's temporaries from 1.155 to 1.054 GB (SPADE) and 0.717 to 0.666 GB (CLADE).
    return dx, after(dw, dx)


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def taps_weight_grad_wins(x_shape, w_shape, stride: int) -> bool:
    """Where `taps_weight_grad` beats XLA:CPU's own filter gradient (benchmarks/convs.py).

    Measured over every convolution of the full-size CLADE / SPADE generators and the multiscale
    discriminator (benchmarks/RESULTS.md, "convs.py"): taps / XLA time was 0.011-0.02 for the
    discriminator's stride-1 kernel-4 256 -> 512 convolutions (17x17 and 33x33 inputs; XLA
    1.4-3.3 s and 8.2-21 s at batch 2 in two runs) and 0.41-0.8 for the generator's wide
    convolutions on grids up to 32x32 (e.g. 1024 -> 1024 at 8x8 and 16x16; 1024 -> 512 at 32x32
    is borderline: 0.78 in one run, 1.15 in a quieter one); it was 1.0-1.9 (no gain or a loss)
    on 64x64 and larger grids, for stride 2, for 1x1 kernels and for narrow layers
    (C_in * C_out < 128 * 512, such as the 512 -> 1 logits layer: 5-9x slower).
    """
    k, _, c, o = w_shape
    h, w = x_shape[1], x_shape[2]
    return stride == 1 and k > 1 and c * o >= 128 * 512 and h * w <= 48 * 48


def rows_weight_grad_wins(x_shape, w_shape, stride: int) -> bool:
    """Where `rows_weight_grad` beats XLA:CPU's filter gradient (benchmarks/convs.py).

    Measured over the full-size generators' convolutions at batch 1 (benchmarks/RESULTS.md,
    "convs.py" with the rows column): rows / XLA 0.43-0.87 for every stride-1 k > 1 layer on a
    64x64 or larger grid whose output is no wider than its input (e.g. 128 -> 64 at 256x256:
    151 vs 230 ms; 64 -> 3: 43 vs 99 ms), but 1.28-1.47 where the output is wider (128 -> 256
    at 128x128, 128 -> 512 at 64x64: the k shifted output gradients side by side get wide).
    """
    k, _, c, o = w_shape
    return stride == 1 and k > 1 and x_shape[1] * x_shape[2] >= 64 * 64 and o <= c


# Where XLA's own filter gradient is used, the late-kernel backward is kept on CPU for kernels or
# inputs at least this large: the full-size models' layers (with it on every convolution their
# step's temporaries were 0.924 GB CLADE / 1.747 GB SPADE at batch 1, with it for big kernels
# only 0.941 / 1.817). Below both, on the small grids and narrow layers of the tests' tiny
# configs, it only cost compile time (tiny training step 31.8 s with it, 18.1 s without).
LATE_KERNEL_BYTES = 1 << 20
LATE_INPUT_BYTES = 4 << 20


def patches_weight_grad_wins(x_shape, w_shape, stride: int) -> bool:
    """Where `patches_weight_grad` beats XLA:CPU's filter gradient and `rows_weight_grad`.

    Measured 2026-12-01 on the full-size generators' shapes at batch 1 (median of 5 jitted
    calls, one process; ms, XLA / rows / patches): SPADE's modulation convolutions 128 -> 128 at
    256x256 284 / 251 / 155, 128 -> 64 at 256x256 233 / 152 / 118, 128 -> 256 at 128x128
    105 / 135 / 69, 128 -> 128 at 128x128 80 / 67 / 37-41, 128 -> 512 at 64x64 36-44 / 63 / 28-30,
    128 -> 256 at 64x64 29 / 20 / 17; the 64 -> 64 convolution at 256x256 131 / 96 / 60-71. It
    lost where the input is wide (256 -> 128 at 128x128: 142 / 108 / 91-126; 512 -> 256 at 64x64
    105 / 78 / 91-117: the im2col block gets k*k*C wide), for narrow outputs (64 -> 3: 81 / 13 /
    38-48) and on small grids (64 -> 64 at 64x64: rows 2.9 vs 4.1-4.5; at 32x32 it ties taps).
    """
    k, _, c, o = w_shape
    return (
        stride == 1
        and k > 1
        and c <= 128
        and o >= 64
        and c * x_shape[1] * x_shape[2] >= (128 * 64 * 64)
    )


def phases_input_grad(
    g: jnp.ndarray, w: jnp.ndarray, stride: int, padding: int, input_hw: tuple[int, int]
) -> jnp.ndarray:
    """The input gradient of a strided `_plain_conv` as stride^2 stride-1 convolutions of g.

    XLA's own form convolves g dilated by the stride (zeros between its pixels) with the
    flipped kernel: stride^2 times the arithmetic, most of it on zeros. The input pixels of one
    phase (y mod s, x mod s) = (r, q) receive only the taps `W[r::s, q::s]`, so
    `dx[s t + r - p, s t' + q - p] = sum_{m, m'} g[t - m, t' - m'] W[r + s m, q + s m']^T`:
    for each phase a stride-1 ("full") correlation of g with that flipped, channel-swapped
    sub-kernel, and the s^2 results interleaved (a reshape). The same sum as the dilated
    convolution's in real arithmetic, without the zeros (float rounding differs, ~1e-7).

    g: (N, H', W', O); w: (k, k, C, O); input_hw: (H, W) of the input -> (N, H, W, C).
    """
    k, _, c, o = w.shape
    s, p = stride, padding
    n, ho, wo, _ = g.shape
    h, wd = input_hw
    t0, t1h, t1w = p // s, -(-(p + h) // s), -(-(p + wd) // s)  # phase rows / columns covered
    rows = []
    for r in range(s):
        cols = []
        for q in range(s):
            sub = w[r::s, q::s]  # (K_r, K_q, C, O): the taps that reach phase (r, q)
            kr, kq = sub.shape[0], sub.shape[1]
            if kr == 0 or kq == 0:  # a kernel smaller than the stride reaches no such pixel
                cols.append(jnp.zeros((n, t1h - t0, t1w - t0, c), g.dtype))
                continue
            kernel = jnp.flip(sub, (0, 1)).transpose(0, 1, 3, 2)  # (K_r, K_q, O, C)
            # z[t] = sum_m g[t - m] sub[m]^T for t in [t0, t1): padding may be negative (a crop)
            pad = ((kr - 1 - t0, t1h - ho), (kq - 1 - t0, t1w - wo))
            cols.append(
                jax.lax.conv_general_dilated(g, kernel, (1, 1), pad, dimension_numbers=_DIMENSIONS)
            )
        rows.append(jnp.stack(cols, axis=3))  # (N, T, T', s, C): phases q of row phase r
    z = jnp.stack(rows, axis=2).reshape(n, (t1h - t0) * s, (t1w - t0) * s, c)
    off = p - s * t0
    return z[:, off : off + h, off : off + wd]


def taps_input_grad_wins(x_shape, w_shape, stride: int, padding: int) -> bool:
    """Where `taps_input_grad` beats XLA:CPU's input gradient (benchmarks/convs.py, dx columns).

    Measured 2026-12-03 (2-core Xeon, median of 9 jitted calls, ms, XLA / taps): 3x3 1024 -> 1024
    at 8x8 74 / 12, 8x16 77 / 17, 16x16 89 / 28, 16x32 108 / 50, 24x24 113 / 57, 32x32 134 / 141;
    batch 2 at 8x8 77 / 17, at 16x16 104 / 52; 5x5 1024 -> 1024 at 8x8 185 / 33; 18x18 unpadded
    (pix2pixHD's reflection-padded blocks) 82 / 35; 512 -> 512 at 8x8 5.5 / 3.2, at 16x16
    9.2 / 8.2, at 32x32 22 / 29; 1024 <-> 512 at 16x16 0.62-0.68x; 256 -> 1024 at 16x16 0.95x;
    a 1x1 kernel 2x slower. So: stride 1, k > 1, at most 24 * 24 input pixels over the whole
    batch (the grid of the matrix products' short side) and C * O >= 512 * 512.
    """
    k, _, c, o = w_shape
    pixels = x_shape[0] * x_shape[1] * x_shape[2]
    return (
        stride == 1 and k > 1 and 0 <= padding <= k - 1 and pixels <= 24 * 24 and c * o >= 512 * 512
    )


def phases_input_grad_wins(x_shape, w_shape, stride: int, padding: int) -> bool:
    """Where `phases_input_grad` beats XLA:CPU's input gradient (benchmarks/convs.py, dx columns).

    Measured 2026-12-03 (2-core Xeon, median of 9 jitted calls, ms, XLA / phases): the
    discriminator's 4x4 stride-2 layers 154 -> 64 at 128x128 (its second scale's input, batch 2)
    68.5 / 19.5 (batch 8: 304 / 76), 64 -> 128 at 129x129 25.1 / 9.9 (batch 8: 114 / 57),
    128 -> 256 at 65x65 11.0 / 10.0, 64 -> 128 at 65x65 4.0 / 3.6, 128 -> 256 at 33x33 4.1 / 3.5;
    the encoders' 3x3 stride-2 64 -> 128 at 256x256 29.7 / 12.8, 128 -> 256 at 128x128
    11.8 / 11.4, 256 -> 512 at 64x64 12.2 / 10.8; but 3 -> 64 at 256x256 (the image channels)
    3.3 / 8.1. So: stride >= 2, a kernel at least the stride, at least 16 input channels, and an
    input of at least `LATE_INPUT_BYTES` as float32 (below, a millisecond at most to gain
    against the compile time of the custom backward).
    """
    k, _, c, _ = w_shape
    size = x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3] * 4
    return stride >= 2 and k >= stride and c >= 16 and size >= LATE_INPUT_BYTES


def input_grad_formulation(x_shape, w_shape, stride: int, padding: int) -> str:
    """The input-gradient form the CPU backward uses: "taps", "phases" or "xla" (XLA's own),
    each where it measured faster (`taps_input_grad_wins`, `phases_input_grad_wins`)."""
    if taps_input_grad_wins(x_shape, w_shape, stride, padding):
        return "taps"
    if phases_input_grad_wins(x_shape, w_shape, stride, padding):
        return "phases"
    return "xla"


def weight_grad_formulation(x_shape, w_shape, stride: int) -> str:
    """The filter-gradient form `conv2d(weight_grad="auto")` uses on CPU: "patches", "taps",
    "rows" or "xla" (XLA's own), each where it measured fastest (see the three rules)."""
    if patches_weight_grad_wins(x_shape, w_shape, stride):
        return "patches"
    if taps_weight_grad_wins(x_shape, w_shape, stride):
        return "taps"
    if rows_weight_grad_wins(x_shape, w_shape, stride):
        return "rows"
    return "xla"


def conv2d(
    x: jnp.ndarray, w: jnp.ndarray, *, stride: int = 1, padding: int = 0, weight_grad: str = "auto"
) -> jnp.ndarray:
    """NHWC x HWIO convolution with PyTorch's symmetric zero padding.

    weight_grad: "auto" (on the CPU backend the form `weight_grad_formulation` picks for the
    shape, with the late-kernel input gradient; XLA's own autodiff on every other backend),
    "xla" (XLA's own), "taps", "rows" or "patches" (stride 1). The forward is the same in all.
    """
    if weight_grad not in WEIGHT_GRAD_MODES:
        raise ValueError(f"weight_grad must be one of {WEIGHT_GRAD_MODES}, got {weight_grad!r}")
    if weight_grad in ("rows", "patches") and stride != 1:
        raise ValueError(f"weight_grad={weight_grad!r} needs stride 1, got stride {stride}")
    if weight_grad in ("taps", "rows", "patches"):
        return _conv_cpu(x, w, stride, padding, weight_grad)
    if weight_grad == "auto" and cpu_fast_path():
        formulation = weight_grad_formulation(x.shape, w.shape, stride)
        fast_dx = input_grad_formulation(x.shape, w.shape, stride, padding) != "xla"
        big = w.size * w.dtype.itemsize >= LATE_KERNEL_BYTES
        if formulation != "xla" or fast_dx or big or x.size * x.dtype.itemsize >= LATE_INPUT_BYTES:
            return _conv_cpu(x, w, stride, padding, formulation)
    return _plain_conv(x, w, stride, padding)


def _wt_u(w: jnp.ndarray, u: jnp.ndarray) -> jnp.ndarray:
    """W^T u for the torch-layout matrix W = (out, in*kh*kw) of the HWIO kernel w, without
    forming W: a mat-vec on w's own layout, the small result permuted to torch's (in, kh, kw)."""
    kh, kw, i, o = w.shape
    return jnp.transpose((w.reshape(-1, o) @ u).reshape(kh, kw, i), (2, 0, 1)).reshape(-1)


def _w_v(w: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """W v (out,) for the same W, v in torch's (in, kh, kw) order."""
    kh, kw, i, o = w.shape
    return jnp.transpose(v.reshape(i, kh, kw), (1, 2, 0)).reshape(-1) @ w.reshape(-1, o)


ONEHOT_METHODS = ("auto", "conv", "gather")


def onehot_conv(
    labels: jnp.ndarray,
    w: jnp.ndarray,
    *,
    stride: int = 1,
    padding: int = 0,
    invalid: str = "zero",
    method: str = "auto",
) -> jnp.ndarray:
    """`conv2d(one_hot(labels, K), w)` for an integer label map, K = w.shape[2].

    labels: (N, H, W) int; w: (k, k, K, O) in the compute dtype -> (N, H', W', O).
    invalid: what a label outside [0, K) contributes: "zero" (the zero row `jax.nn.one_hot`
      gives) or "nan" (as if the one-hot input had been poisoned with NaN at that pixel).
    method: "gather" (tap-wise rows of w), "conv" (the one-hot convolution) or "auto" (gather on
      the CPU backend, conv elsewhere).
    """
    if method not in ONEHOT_METHODS:
        raise ValueError(f"method must be one of {ONEHOT_METHODS}, got {method!r}")
    if invalid not in ("zero", "nan"):
        raise ValueError(f"invalid must be 'zero' or 'nan', got {invalid!r}")
    k, _, num, o = w.shape
    bad = (labels < 0) | (labels >= num)
    if method == "auto":
        method = "gather" if cpu_fast_path() else "conv"
    if method == "conv":
        x = jax.nn.one_hot(labels, num, dtype=w.dtype)
        if invalid == "nan":
            x = jnp.where(bad[..., None], jnp.nan, x)
        return conv2d(x, w, stride=stride, padding=padding)
    # Rows num (padding and "zero" labels) and num + 1 ("nan" labels) follow the classes.
    extra = jnp.stack([jnp.zeros((k, k, o), w.dtype), jnp.full((k, k, o), jnp.nan, w.dtype)], 2)
    table = jnp.concatenate([w, extra], axis=2)  # (k, k, K + 2, O)
    idx = jnp.where(bad, num + 1 if invalid == "nan" else num, labels)
    n, h, wd = labels.shape
    p, s = padding, stride
    idx = jnp.pad(idx, ((0, 0), (p, p), (p, p)), constant_values=num)
    ho, wo = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    taps = jnp.stack(
        [
            jax.lax.slice(
                idx, (0, i, j), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1), (1, s, s)
            )
            for i in range(k)
            for j in range(k)
        ]
    )  # (k*k, N, H', W') int
    rows = table.reshape(k * k, num + 2, o)
    # A loop over the taps, summed in tap order. Unrolled, XLA:CPU gathers all k*k
    # (N, H', W', O) row sets up front and keeps them for one fused sum (139 MB for the
    # discriminator's first layer at 256x256, batch 1, in the training step), and the weight
    # gradient's scatter-adds hold as much again: the full-size SPADE step's temporaries were
    # 2.8 GB unrolled (2.7 with the gathers chained by `after`) against 1.8 GB with this loop,
    # whose scatter-adds are slower (37 vs 4 ms for the discriminator's layer,
    # benchmarks/convs.py).
    body = lambda y, tap: (y + rows[tap[0]][tap[1]], None)
    y, _ = jax.lax.scan(body, rows[0][taps[0]], (jnp.arange(1, k * k), taps[1:]))
    return y


def _l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


class Conv2d(nnx.Module):
    """NHWC convolution, kernel (kh, kw, in, out), PyTorch padding semantics.

    Args:
      in_features / out_features: channel counts.
      kernel_size: square kernel size.
      stride: stride.
      padding: symmetric zero padding on each side (PyTorch `padding=`).
      use_bias: learn a bias.
      spectral_norm: wrap the kernel with spectral normalization.
      dtype: compute dtype (parameters stay float32).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = True,
        spectral_norm: bool = False,
        dtype=jnp.float32,
        use_running_average: bool = False,
        rngs: nnx.Rngs,
    ):
        k = kernel_size
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.spectral_norm = spectral_norm
        self.use_running_average = use_running_average
        self.kernel = nnx.Param(xavier_normal()(rngs.params(), (k, k, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        if spectral_norm:
            u = jax.random.normal(rngs.params(), (out_features,))
            v = jax.random.normal(rngs.params(), (in_features * k * k,))
            self.u = SpectralVector(_l2_normalize(u))
            self.v = SpectralVector(_l2_normalize(v))

    def weight(self) -> jnp.ndarray:
        """The effective kernel (spectral-normalized if enabled), float32 (kh, kw, in, out)."""
        w, sigma = self.kernel_and_sigma()
        return w if sigma is None else w / sigma

    def kernel_and_sigma(self) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """(raw kernel (kh, kw, in, out), sigma or None): the effective kernel is kernel / sigma.

        With spectral norm in training mode this runs one power iteration and stores u, v.
        """
        w = self.kernel[...]
        if not self.spectral_norm:
            return w, None
        # The power iteration on torch's W = (out, in*kh*kw) without materializing W (that
        # would be a transposed copy of every kernel).
        u, v = self.u[...], self.v[...]
        if not self.use_running_average:
            w_sg = jax.lax.stop_gradient(w)
            v = _l2_normalize(_wt_u(w_sg, u))
            u = _l2_normalize(_w_v(w_sg, v))
            # set_value, not `[...] =`: under a trace flax's indexed write probes the tracer's
            # `.sharding`, whose error message walks the whole jaxpr (6.9 of the 10.9 s it
            # took to trace a tiny training step).
            self.u.set_value(u)
            self.v.set_value(v)
        return w, jnp.dot(u, _w_v(w, v))

    def __call__(
        self,
        x: jnp.ndarray | None,
        *,
        labels: jnp.ndarray | None = None,
        num_classes: int = 0,
        invalid: str = "zero",
    ) -> jnp.ndarray:
        """x: (N, H, W, in) -> (N, H', W', out) in the compute dtype.

        With `labels=` (N, H, W) int, the input is `concat([one_hot(labels, num_classes), x])`
        and x holds only the channels after the one-hot ones (or is None); it is computed
        without the one-hot tensor (`onehot_conv`; `invalid` as there: "nan" matches poisoning
        the one-hot input with NaN at invalid labels).

        Spectral norm divides by sigma whichever is smaller, the kernel or the convolution's
        output (`conv(x, W) / sigma == conv(x, W / sigma)`: the convolution is linear), so the
        step materializes the smaller of the two scaled copies (and its cotangent). For the
        generator's 1024-channel layers at 8x8-32x32 that is the output (a 3x3 1024 -> 1024
        kernel is 36 MB, its 16x16 output 1 MB); for the 256x256 layers, the kernel.
        """
        if labels is not None:
            return self._call_onehot(labels, num_classes, x, invalid)
        w, sigma = self.kernel_and_sigma()
        n, h, wd = x.shape[0], x.shape[1], x.shape[2]
        k, s, p = w.shape[0], self.stride, self.padding
        out_size = n * ((h + 2 * p - k) // s + 1) * ((wd + 2 * p - k) // s + 1) * w.shape[3]
        scale_output = sigma is not None and out_size < w.size
        if sigma is not None and not scale_output:
            w = w / sigma
        y = conv2d(x.astype(self.dtype), w.astype(self.dtype), stride=s, padding=p)
        if scale_output:
            y = y / sigma.astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def _call_onehot(self, labels, num_classes: int, rest, invalid: str) -> jnp.ndarray:
        w = self.weight().astype(self.dtype)  # spectral norm over the whole kernel
        if w.shape[2] != num_classes + (0 if rest is None else rest.shape[-1]):
            raise ValueError(
                f"kernel has {w.shape[2]} input channels, got {num_classes} classes + "
                f"{0 if rest is None else rest.shape[-1]}"
            )
        s, p = self.stride, self.padding
        y = onehot_conv(labels, w[:, :, :num_classes], stride=s, padding=p, invalid=invalid)
        if rest is not None:
            y = y + conv2d(rest.astype(self.dtype), w[:, :, num_classes:], stride=s, padding=p)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def fold_spectral_norm(module: nnx.Module) -> nnx.Module:
    """A copy of an evaluation-mode module with every spectral-normalized `Conv2d` folded.

    In the copy each such layer's kernel is its effective evaluation kernel `W / sigma` (from the
    stored u, v) and its spectral norm is off, so the outputs are unchanged (up to float
    rounding) and no sigma is computed per call. `module` itself is not modified. The copy is for
    inference only: its kernels are no longer the trained `weight_orig`, so do not train or
    checkpoint it. A module with no spectral norm comes back as a plain copy.

    Raises:
      ValueError: a spectral-normalized layer is in training mode (its u, v would still move).
    """
    folded = nnx.clone(module)  # new Variables: `nnx.merge(*nnx.split(m))` would share them
    layers = [
        (path, node)
        for path, node in nnx.iter_graph(folded)
        if isinstance(node, Conv2d) and node.spectral_norm
    ]
    for path, layer in layers:
        if not layer.use_running_average:
            name = "/".join(map(str, path))
            raise ValueError(
                f"fold_spectral_norm needs an evaluation-mode module (call .eval() first); "
                f"layer {name!r} is in training mode"
            )
        layer.kernel.set_value(layer.weight())
        layer.spectral_norm = False
        del layer.u, layer.v
    return folded


class Linear(nnx.Module):
    """Dense layer, kernel (in, out), xavier-normal(0.02) init, zero bias."""

    def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(xavier_normal()(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        return y + self.bias[...].astype(self.dtype)
