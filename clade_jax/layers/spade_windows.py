"""SPADE's modulation convolutions computed only where the label window is not uniform (CPU).

SPADE computes `gamma, beta = conv_k(actv)` with `actv = ReLU(conv_k(one_hot(labels) [+ edges]))`.
At a pixel whose (2k-1) x (2k-1) label window (k x k taps of the gamma / beta convolution, each
reading a k x k window of the label map) lies inside the image and holds one class (and one edge
value), every input of both convolutions is that class's own constant, so

    actv_c = ReLU(b_shared + sum_taps W_shared[tap, c] (+ e * sum_taps W_shared[tap, edge]))
    gamma_c = b_gamma + actv_c @ sum_taps W_gamma[tap]          (beta alike)

a per-(class, edge) table: the same sums as the convolutions in real arithmetic, in another order
(float32 rounding, ~1e-6 of the largest value). CLADE's observation is that most pixels of a
semantic label map are such interior pixels; here: 76% of a 256x256 map of 40 Voronoi regions at
k = 3, 88% with 10, 56% at 128x128; 71-95% (mean 83%) of the 13 COCO-Stuff training label
maps that the official repository ships, resized to 256x256 (benchmarks/RESULTS.md). The
convolution itself runs only at the other, *boundary* pixels: their im2col rows (k*k*128 wide,
gathered from the unpadded grid with a mask) are multiplied by the (k*k*128, C) kernel in blocks
of `CHUNK` pixels, in a loop whose trip count is the number of boundary pixels, so the work is
proportional to them. There is no capacity and no fallback branch (`lax.cond` around XLA:CPU's
convolution measured 2.7x slower than the convolution alone). The blocks' rows go after the table
in one buffer (`dynamic_update_slice`) and every pixel takes its row by one gather (a scatter into
the grid inside the loop made the full-size step 1.2-1.8x slower). The backward pass (a
`custom_vjp`) runs the same blocks: the kernel's gradient as patches^T @ output gradient, the
activation's gradient at the pixels within k // 2 of a boundary pixel (nowhere else is it
non-zero), the table's as a segment sum over the interior pixels.

Measured (Xeon 2-core machine, 2026-12-02; a scratch timing of one modulation, jitted,
fwd + bwd, 256x256, 128 -> 2 x 128, median of 5, two alternations; the dense time itself varied
0.74-1.21 s between processes): 0.42x of the dense convolutions at 12% boundary pixels, 0.56-0.61x
at 24%, 1.32-1.34x at 95% (every pixel its own class); the full-size ADE20k SPADE training
step at batch 1 on 40-region maps: see benchmarks/RESULTS.md ("SPADE windows").

Where it is used (`spade.SPADE(windows=True)`, `config.model.spade_windows`): the CPU fast path
(`conv.cpu_fast_path`) on grids of at least `MIN_PIXELS` pixels. It is slower on maps where most
pixels are boundaries, and it raises the full-size SPADE step's temporaries from 0.77 to 0.84 GB
(at the peak, the forward gathers of two 256x256 layers' gamma and beta are live for the
backward pass). So the trainer chooses it from the data (`config.model.spade_windows = "auto"`,
the default; `models.build.resolve_spade_windows`): on where the first training batch's
`interior_fraction` is at least `AUTO_MIN_INTERIOR`. The full-size ADE20k SPADE step at batch 1,
windows / dense (2026-12-03, 2-core Xeon with AVX-512, two steps compiled in one process, 4
alternating rounds): 0.866 at interior 0.765 (40 Voronoi regions), 0.990 at 0.574 (150
regions), 1.281 at 0 (every pixel its own class); on the 2-core AMD EPYC (AVX2) of the issue,
`benchmarks/spade_windows.py`, 2026-12-04: 0.909 at 0.765, 0.886 at 0.683, 0.903 at 0.644,
1.049 at 0.574, 1.234 at 0. Break-even between 0.574 and 0.644 on both, so the threshold is 0.6.
MIN_PIXELS = 64^2 or 32^2 instead of 128^2 made the windowed step 1.012 / 1.020x
slower, CHUNK = 1024 0.995x (not adopted). GPU / TPU keep the
plain convolutions; `conv.plain_formulation()` forces them here too (the tests compare).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHUNK = 512  # boundary pixels per matrix product: a (512, 9 * 128) patch block is 2.4 MB
MIN_PIXELS = 128 * 128  # smaller grids keep the dense convolutions


def uniform_keys(
    labels: jnp.ndarray, num_classes: int, edges: jnp.ndarray | None = None
) -> jnp.ndarray:
    """(N, H, W) int32 key of each pixel's modulation input: the label, plus `num_classes` where
    the edge map is 1; -1 where no table entry applies (a label outside [0, num_classes) or an
    edge value other than 0 and 1)."""
    valid = (labels >= 0) & (labels < num_classes)
    keys = labels.astype(jnp.int32)
    if edges is not None:
        valid &= (edges == 0) | (edges == 1)
        keys = keys + jnp.where(edges == 1, num_classes, 0).astype(jnp.int32)
    return jnp.where(valid, keys, -1)


def interior(keys: jnp.ndarray, kernel_size: int) -> jnp.ndarray:
    """(N, H, W) bool: the (2k-1)^2 window of `keys` around the pixel lies inside the image and
    holds one key >= 0 (the window of a k x k convolution over a k x k convolution, both padded
    by k // 2)."""
    r = 2 * (kernel_size // 2)
    n, h, w = keys.shape
    padded = jnp.pad(keys, ((0, 0), (r, r), (r, r)), constant_values=-1)
    # Separable: a pixel's row segment is uniform, then the column of such segments is.
    rows = jnp.ones((n, h + 2 * r, w), bool)
    for dj in range(2 * r + 1):
        rows &= padded[:, :, dj : dj + w] == padded[:, :, r : r + w]
    out = keys >= 0
    for di in range(2 * r + 1):
        out &= rows[:, di : di + h] & (padded[:, di : di + h, r : r + w] == keys)
    return out


# Windows on from this interior fraction: above the step's measured break-even (module docstring).
AUTO_MIN_INTERIOR = 0.6


def interior_fraction(labels, num_classes: int, kernel_size: int = 3) -> float:
    """Fraction of the pixels of label maps (N, H, W) whose (2k-1)^2 window is uniform
    (`interior` of `uniform_keys`; labels outside [0, num_classes) are never interior)."""
    labels = jnp.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"label maps must be (N, H, W), got shape {labels.shape}")
    return float(interior(uniform_keys(labels, num_classes), kernel_size).mean())


def _dilate(mask: jnp.ndarray, radius: int) -> jnp.ndarray:
    """(H, W) bool: within `radius` (Chebyshev) of a True pixel."""
    h, w = mask.shape
    r = radius
    padded = jnp.pad(mask, r)
    rows = functools.reduce(jnp.logical_or, [padded[:, dj : dj + w] for dj in range(2 * r + 1)])
    return functools.reduce(jnp.logical_or, [rows[di : di + h] for di in range(2 * r + 1)])


def _pixel_list(mask: jnp.ndarray):
    """(indices, count, rank) of the True pixels of an (H, W) mask: flat indices in raster order
    padded to H*W + CHUNK (the spare slots point at pixel 0 and are never live), their number,
    and each pixel's position in that list ((H*W,) int32; meaningless where mask is False)."""
    flat = mask.reshape(-1)
    (idx,) = jnp.nonzero(flat, size=flat.size + CHUNK, fill_value=0)
    rank = jnp.cumsum(flat, dtype=jnp.int32) - 1
    return idx.astype(jnp.int32), flat.sum(dtype=jnp.int32), rank


def _chunks(count, body, init):
    """fori_loop over the CHUNK-sized blocks of a pixel list with `count` live entries:
    body(start, live (CHUNK, 1) bool, carry) -> carry; ceil(count / CHUNK) trips."""

    def step(t, carry):
        start = t * CHUNK
        return body(start, (start + jnp.arange(CHUNK) < count)[:, None], carry)

    return jax.lax.fori_loop(0, (count + CHUNK - 1) // CHUNK, step, init)


def _neighbours(pix, h: int, w: int, kernel_size: int, sign: int = 1):
    """(CHUNK, k*k) flat indices of the pixels (i + sign (di - p), j + sign (dj - p)) around each
    pixel (i, j) of `pix`, taps (di, dj) in (row, column) order, clipped into the image, and
    whether each lies inside it. The gathers read the unpadded grid (no zero-padded copy of the
    activation; the full-size step's measured temporaries were the same either way)."""
    p = kernel_size // 2
    d = sign * (jnp.arange(kernel_size) - p)
    di, dj = [a.reshape(-1) for a in jnp.meshgrid(d, d, indexing="ij")]
    i, j = (pix // w)[:, None] + di, (pix % w)[:, None] + dj
    inside = (i >= 0) & (i < h) & (j >= 0) & (j < w)
    return jnp.clip(i, 0, h - 1) * w + jnp.clip(j, 0, w - 1), inside


def _patches(flat, pix, h, w, kernel_size, sign=1, keep=None):
    """(CHUNK, k*k*C) im2col rows of `flat` (H*W, C) around `pix`; zeros outside the image
    (and where `keep` (H*W,) bool is False)."""
    src, inside = _neighbours(pix, h, w, kernel_size, sign)
    if keep is not None:
        inside &= keep[src]
    return jnp.where(inside[..., None], flat[src], 0).reshape(pix.shape[0], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def modulate_image(actv, kernel, bias, table, keys, kernel_size):
    """One image: (H*W, O), `table[keys]` where the key window is uniform (`interior`), else the
    k x k convolution of actv (H, W, Ch) with kernel (k, k, Ch, O) plus bias (zero padding
    k // 2), computed at those boundary pixels only (work proportional to their number).

    The boundary rows are written block by block (`dynamic_update_slice`) after the table in
    one buffer, and every pixel takes its row from there by one gather: scattering the blocks
    into the grid inside the loop made the full-size SPADE step 1.2-1.8x slower (measured)."""
    return _modulate_fwd(actv, kernel, bias, table, keys, kernel_size)[0]


def _boundary(keys, kernel_size):
    """(interior (H, W), boundary pixel list, its length, each pixel's row in the buffer)."""
    inner = interior(keys[None], kernel_size)[0]
    idx, count, rank = _pixel_list(~inner)
    return inner, idx, count, rank


def _modulate_fwd(actv, kernel, bias, table, keys, kernel_size):
    h, w, ch = actv.shape
    k = kernel_size
    nk = table.shape[0]
    flat_actv = actv.reshape(h * w, ch)
    flat_kernel = kernel.reshape(k * k * ch, -1)  # im2col order (tap row, tap column, channel)
    inner, idx, count, rank = _boundary(keys, k)

    def body(start, live, buf):
        pix = jax.lax.dynamic_slice(idx, (start,), (CHUNK,))
        patches = _patches(flat_actv, pix, h, w, k)  # (CHUNK, k*k*Ch)
        vals = jnp.where(live, patches @ flat_kernel + bias, 0)
        return jax.lax.dynamic_update_slice(buf, vals, (nk + start, 0))

    buf = jnp.concatenate([table, jnp.zeros((h * w + CHUNK, table.shape[1]), table.dtype)])
    buf = _chunks(count, body, buf)  # rows: the table, then the boundary pixels in list order
    row = jnp.where(inner, jnp.maximum(keys, 0), nk + rank.reshape(h, w)).reshape(-1)
    return jnp.take(buf, row, axis=0), (flat_actv, kernel, keys, actv.shape, nk)


def _modulate_bwd(kernel_size, residuals, g):
    flat_actv, kernel, keys, (h, w, ch), nk = residuals
    k, p = kernel_size, kernel_size // 2
    o = kernel.shape[-1]
    inner, idx, count, _ = _boundary(keys, k)
    flat_inner = inner.reshape(-1)
    # The table's rows: the sums of g over the interior pixels of each key.
    dtable = jax.ops.segment_sum(g, jnp.where(flat_inner, keys.reshape(-1), nk), nk + 1)[:nk]

    def weight_body(start, live, carry):  # dW = patches^T g over the boundary pixels
        dk, db = carry
        pix = jax.lax.dynamic_slice(idx, (start,), (CHUNK,))
        gc = jnp.where(live, g[pix], 0)  # (CHUNK, O)
        return dk + _patches(flat_actv, pix, h, w, k).T @ gc, db + gc.sum(0)

    dk, db = _chunks(
        count, weight_body, (jnp.zeros((k * k * ch, o), g.dtype), jnp.zeros(o, g.dtype))
    )
    # d actv(q) = sum_taps W[tap] g(q + p - tap) over boundary pixels: nonzero only within p
    # of one. g's rows are gathered where they are boundary pixels inside the image, else 0.
    near = _dilate(~inner, p)
    nidx, ncount, nrank = _pixel_list(near)
    transposed = jnp.swapaxes(kernel, 2, 3).reshape(k * k * o, ch)  # [(tap, o), c] = W[tap, c, o]

    def input_body(start, live, buf):
        pix = jax.lax.dynamic_slice(nidx, (start,), (CHUNK,))
        rows = _patches(g, pix, h, w, k, sign=-1, keep=~flat_inner)  # g(q + p - tap)
        rows = jnp.where(live, rows, 0)  # (CHUNK, k*k*O)
        return jax.lax.dynamic_update_slice(buf, rows @ transposed, (start, 0))

    buf = _chunks(ncount, input_body, jnp.zeros((h * w + CHUNK, ch), g.dtype))
    dactv = jnp.where(near.reshape(-1, 1), jnp.take(buf, nrank, axis=0, mode="clip"), 0)
    return dactv.reshape(h, w, ch), dk.reshape(kernel.shape), db, dtable, None


modulate_image.defvjp(_modulate_fwd, _modulate_bwd)


def modulation(
    actv: jnp.ndarray,
    keys: jnp.ndarray,
    shared_kernel: jnp.ndarray,
    shared_bias: jnp.ndarray,
    kernel: jnp.ndarray,
    bias: jnp.ndarray,
    num_classes: int,
) -> jnp.ndarray:
    """conv_k(actv, kernel) + bias (zero padding k // 2), from per-key tables at interior pixels.

    actv: (N, H, W, Ch), the shared activation ReLU(conv_k(inputs, shared_kernel) + shared_bias)
      whose inputs are one_hot(label, num_classes) [+ edge], encoded by `uniform_keys` as keys
      (N, H, W); shared_kernel: (k, k, num_classes [+ 1], Ch); kernel: (k, k, Ch, O) (gamma's
      or beta's). Returns (N, H, W, O), the dense convolution's up to rounding.
    """
    k = kernel.shape[0]
    n, h, w, _ = actv.shape
    sums = shared_kernel.sum((0, 1))  # (K [+ 1], Ch): one class's constant input, every tap
    pre = sums[:num_classes]
    if shared_kernel.shape[2] > num_classes:  # the edge channel: key K + c is class c on an edge
        pre = jnp.concatenate([pre, pre + sums[num_classes]])
    table = jax.nn.relu(pre + shared_bias) @ kernel.sum((0, 1)) + bias  # (keys, O)
    # Image by image (unrolled): a vmap would batch the loops, every image running for the
    # longest boundary list of the batch.
    out = [modulate_image(actv[b], kernel, bias, table, keys[b], k) for b in range(n)]
    return jnp.stack(out).reshape(n, h, w, -1)
