"""The SPADE / CLADE generator (the official `SPADEGenerator`, with CLADE's options), NHWC.

Structure (nf = ngf; resolutions for `num_upsampling_layers='normal'` at 256x256):

    fc          3x3 conv on the one-hot map downsampled to (sh, sw) = (8, 8)
                (or, with the VAE, Linear(z_dim, 16nf*sh*sw) reshaped)
    head_0      16nf -> 16nf    8x8
    G_middle_0  16nf -> 16nf    16x16  (after one 2x nearest upsampling)
    G_middle_1  16nf -> 16nf    16x16  (32x32 for 'more' / 'most')
    up_0..up_3  16nf -> 8nf -> 4nf -> 2nf -> nf, each after a 2x upsampling
    [up_4]      nf -> nf/2 ('most' only)
    conv_img    3x3 conv to RGB after leaky_relu(0.2); tanh

Each block is `ResnetBlock`: `x_s + conv_1(lrelu(norm_1(conv_0(lrelu(norm_0(x))))))`, with the
learned shortcut `x_s = conv_s(norm_s(x))` (no activation, no bias) when fin != fout; the block
convolutions are spectral-normalized (`norm_G=spectral...`). The norms are CLADE or SPADE layers.

The label pyramid (labels, edges, ICPE map at every resolution) is computed once per forward pass
and shared by all layers at a resolution. Module and attribute names follow the official ones, so
`nnx.capture(..., method_outputs=nnx.Intermediate)` gives the same intermediates as PyTorch hooks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from clade_jax.layers.clade import CLADE
from clade_jax.layers.conv import Conv2d, Linear
from clade_jax.layers.labels import instance_edges, resize_nearest
from clade_jax.layers.spade import SPADE, nan_where_invalid

NUM_UP = {"normal": 5, "more": 6, "most": 7}


class Cond(NamedTuple):
    """Conditioning maps at one resolution: labels (N,h,w) int, edges (N,h,w), icpe (N,h,w,2)."""

    labels: jnp.ndarray
    edges: jnp.ndarray | None
    icpe: jnp.ndarray | None

    def at(self, size: tuple[int, int]) -> Cond:
        r = lambda a: None if a is None else resize_nearest(a, size)
        return Cond(r(self.labels), r(self.edges), r(self.icpe))


def make_norm(
    kind: str,
    num_features: int,
    num_classes: int,
    *,
    pfn: str,
    instance: bool,
    icpe: bool,
    dtype,
    norm_kwargs: dict | None,
    spade_windows: bool = False,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A CLADE or SPADE layer from explicit options (`spade_windows`: `SPADE`'s `windows`)."""
    if kind == "clade":
        return CLADE(
            num_features,
            num_classes,
            pfn,
            icpe=icpe,
            instance_edge=instance,
            dtype=dtype,
            norm_kwargs=norm_kwargs,
            rngs=rngs,
        )
    if kind == "spade":
        return SPADE(
            num_features,
            num_classes,
            pfn,
            instance_edge=instance,
            dtype=dtype,
            norm_kwargs=norm_kwargs,
            windows=spade_windows,
            rngs=rngs,
        )
    if kind == "none":
        return Identity()
    raise ValueError(f"norm must be 'clade', 'spade' or 'none', got {kind!r}")


class Identity(nnx.Module):
    """`norm='none'`: no normalization at all (the convolution-only floor of the benchmarks)."""

    def __call__(self, x, labels, **unused):
        return x


def modulate(norm: nnx.Module, x: jnp.ndarray, cond: Cond) -> jnp.ndarray:
    """Apply a CLADE or SPADE layer with the maps it uses."""
    if isinstance(norm, CLADE):
        return norm(x, cond.labels, icpe=cond.icpe, edges=cond.edges)
    return norm(x, cond.labels, edges=cond.edges)


def upsample2x(x: jnp.ndarray) -> jnp.ndarray:
    """Nearest 2x upsampling (`nn.Upsample(scale_factor=2)`), NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResnetBlock(nnx.Module):
    """SPADEResnetBlock / CLADE block (see the module docstring).

    `extra_channels` is 1 for CLADE with instance maps: its norms append the edge channel, so the
    convolutions after them take fin + 1 (or fmiddle + 1) inputs.
    """

    def __init__(
        self,
        fin: int,
        fout: int,
        num_classes: int,
        *,
        norm: str,
        pfn: str,
        instance: bool,
        icpe: bool,
        spectral_norm: bool,
        dtype,
        norm_kwargs: dict | None,
        spade_windows: bool = False,
        rngs: nnx.Rngs,
    ):
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        a = 1 if (norm == "clade" and instance) else 0
        conv = lambda i, o, k, bias=True: Conv2d(
            i,
            o,
            k,
            padding=k // 2,
            use_bias=bias,
            spectral_norm=spectral_norm,
            dtype=dtype,
            rngs=rngs,
        )
        nrm = lambda c: make_norm(
            norm,
            c,
            num_classes,
            pfn=pfn,
            instance=instance,
            icpe=icpe,
            dtype=dtype,
            norm_kwargs=norm_kwargs,
            spade_windows=spade_windows,
            rngs=rngs,
        )
        self.conv_0 = conv(fin + a, fmiddle, 3)
        self.conv_1 = conv(fmiddle + a, fout, 3)
        if self.learned_shortcut:
            self.conv_s = conv(fin + a, fout, 1, bias=False)
        self.norm_0 = nrm(fin)
        self.norm_1 = nrm(fmiddle)
        if self.learned_shortcut:
            self.norm_s = nrm(fin)

    def __call__(self, x: jnp.ndarray, cond: Cond) -> jnp.ndarray:
        x_s = self.conv_s(modulate(self.norm_s, x, cond)) if self.learned_shortcut else x
        dx = self.conv_0(jax.nn.leaky_relu(modulate(self.norm_0, x, cond), 0.2))
        dx = self.conv_1(jax.nn.leaky_relu(modulate(self.norm_1, dx, cond), 0.2))
        return x_s + dx


def set_spade_geometry(
    module: nnx.Module,
    num_classes: int,
    ngf: int,
    num_upsampling_layers: str,
    crop_size: int,
    aspect_ratio: float,
    *,
    norm: str,
    use_instance: bool,
    icpe: bool,
    dtype,
) -> None:
    """Validate and set what the SPADE-style generators share: the latent grid (sh, sw) =
    (round(sw / aspect_ratio), crop_size / 2**num_up) and the conditioning options."""
    if num_upsampling_layers not in NUM_UP:
        raise ValueError(
            f"num_upsampling_layers must be one of {list(NUM_UP)}, got {num_upsampling_layers!r}"
        )
    if icpe and norm != "clade":
        raise ValueError("icpe=True requires norm='clade'")
    module.num_classes = num_classes
    module.ngf = ngf
    module.use_instance = use_instance
    module.use_icpe = icpe
    module.num_upsampling_layers = num_upsampling_layers
    module.num_up = NUM_UP[num_upsampling_layers]
    module.sw = crop_size // 2**module.num_up
    module.sh = round(module.sw / aspect_ratio)
    module.dtype = dtype


def label_pyramid_of(module: nnx.Module, labels, instance, icpe) -> dict:
    """The label pyramid, computed once per forward pass: {(h, w): Cond} for every resolution
    (sh, sw) * 2**k, k = 0..num_up, of a module set up by `set_spade_geometry`."""
    if module.use_instance and instance is None:
        raise ValueError("this generator was built with use_instance=True: pass instance=")
    if module.use_icpe and icpe is None:
        raise ValueError("this generator was built with icpe=True: pass icpe=(N,H,W,2)")
    edges = instance_edges(instance) if module.use_instance else None
    full = Cond(labels, edges, icpe if module.use_icpe else None)
    sizes = [(module.sh * 2**k, module.sw * 2**k) for k in range(module.num_up + 1)]
    return {s: full.at(s) for s in sizes}


def add_resnet_blocks(
    module: nnx.Module, nf: int, num_classes: int, num_upsampling_layers: str, **block_kwargs
) -> int:
    """Set the official residual blocks on `module`: head_0, G_middle_0, G_middle_1 (16nf),
    up_0..up_3 (16nf -> nf) and, for 'most', up_4 (nf -> nf/2). Returns the final width.

    `block_kwargs` are `ResnetBlock`'s keyword arguments (norm, pfn, instance, icpe,
    spectral_norm, dtype, norm_kwargs, spade_windows, rngs).
    """
    block = lambda fin, fout: ResnetBlock(fin, fout, num_classes, **block_kwargs)
    module.head_0 = block(16 * nf, 16 * nf)
    module.G_middle_0 = block(16 * nf, 16 * nf)
    module.G_middle_1 = block(16 * nf, 16 * nf)
    module.up_0 = block(16 * nf, 8 * nf)
    module.up_1 = block(8 * nf, 4 * nf)
    module.up_2 = block(4 * nf, 2 * nf)
    module.up_3 = block(2 * nf, 1 * nf)
    if num_upsampling_layers == "most":
        module.up_4 = block(nf, nf // 2)
        return nf // 2
    return nf


class Generator(nnx.Module):
    """SPADE / CLADE generator.

    Args:
      num_classes: label classes, counting the don't-care class (ADE20k 151, COCO-Stuff 183,
        Cityscapes 35).
      norm: "clade", "spade", or "none" (no normalization layers: the benchmarks' floor).
      param_free_norm: "batch" (official: synchronized BatchNorm), "instance", "switchable",
        "none".
      ngf: base width (64 in the papers).
      crop_size: output width; the latent grid is crop_size / 2**num_up wide.
      aspect_ratio: width / height (Cityscapes: 2).
      num_upsampling_layers: "normal", "more" or "most".
      use_vae: start from z through a Linear layer instead of the downsampled label map.
      z_dim: latent size of the VAE path.
      use_instance: the inputs include an instance map (edges are computed inside).
      icpe: CLADE-ICPE (requires norm="clade").
      spectral_norm: spectral normalization on the block convolutions (official default).
      dtype: compute dtype (parameters and normalization statistics stay float32).
      norm_kwargs: extra arguments of the param-free norms (momentum, eps, switchable_batch).
      spade_windows: SPADE layers compute their modulation convolutions only where the label
        window is not uniform, on CPU (`SPADE`'s `windows`; `clade_jax.layers.spade_windows`).

    Call: `G(labels, *, z=None, instance=None, icpe=None, key=None) -> (N, H, W, 3)` in [-1, 1].
    """

    def __init__(
        self,
        num_classes: int,
        *,
        norm: str = "clade",
        param_free_norm: str = "batch",
        ngf: int = 64,
        crop_size: int = 256,
        aspect_ratio: float = 1.0,
        num_upsampling_layers: str = "normal",
        use_vae: bool = False,
        z_dim: int = 256,
        use_instance: bool = False,
        icpe: bool = False,
        spectral_norm: bool = True,
        dtype=jnp.float32,
        norm_kwargs: dict | None = None,
        spade_windows: bool = False,
        rngs: nnx.Rngs,
    ):
        set_spade_geometry(
            self,
            num_classes,
            ngf,
            num_upsampling_layers,
            crop_size,
            aspect_ratio,
            norm=norm,
            use_instance=use_instance,
            icpe=icpe,
            dtype=dtype,
        )
        nf = ngf
        self.use_vae = use_vae
        self.z_dim = z_dim
        semantic_nc = num_classes + (1 if use_instance else 0)
        if use_vae:
            self.fc = Linear(z_dim, 16 * nf * self.sw * self.sh, dtype=dtype, rngs=rngs)
        else:
            self.fc = Conv2d(semantic_nc, 16 * nf, 3, padding=1, dtype=dtype, rngs=rngs)
        final_nc = add_resnet_blocks(
            self,
            nf,
            num_classes,
            num_upsampling_layers,
            norm=norm,
            pfn=param_free_norm,
            instance=use_instance,
            icpe=icpe,
            spectral_norm=spectral_norm,
            dtype=dtype,
            norm_kwargs=norm_kwargs,
            spade_windows=spade_windows,
            rngs=rngs,
        )
        self.conv_img = Conv2d(final_nc, 3, 3, padding=1, dtype=dtype, rngs=rngs)

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the generated image."""
        return self.sh * 2**self.num_up, self.sw * 2**self.num_up

    def __call__(
        self,
        labels: jnp.ndarray,
        *,
        z: jnp.ndarray | None = None,
        instance: jnp.ndarray | None = None,
        icpe: jnp.ndarray | None = None,
        key: jax.Array | None = None,
    ) -> jnp.ndarray:
        """labels (N, H, W) int, z (N, z_dim), instance (N, H, W) int, icpe (N, H, W, 2)."""
        pyramid = label_pyramid_of(self, labels, instance, icpe)
        c = lambda k: pyramid[(self.sh * 2**k, self.sw * 2**k)]
        n = labels.shape[0]
        if self.use_vae:
            if z is None:
                if key is None:
                    raise ValueError("a VAE generator needs z= or key= to sample z")
                z = jax.random.normal(key, (n, self.z_dim), jnp.float32)
            x = self.fc(z).reshape(n, self.sh, self.sw, 16 * self.ngf)
        else:
            c0 = c(0)
            rest = None if c0.edges is None else c0.edges[..., None]
            # fc(semantic_input(labels, edges)) without the one-hot tensor
            x = self.fc(rest, labels=c0.labels, num_classes=self.num_classes)
            x = nan_where_invalid(x, c0.labels, self.num_classes)
        x = self.head_0(x, c(0))
        k = 1
        x = self.G_middle_0(upsample2x(x), c(k))
        if self.num_upsampling_layers in ("more", "most"):
            k += 1
            x = upsample2x(x)
        x = self.G_middle_1(x, c(k))
        for name in ("up_0", "up_1", "up_2", "up_3") + (
            ("up_4",) if self.num_upsampling_layers == "most" else ()
        ):
            k += 1
            x = getattr(self, name)(upsample2x(x), c(k))
        x = self.conv_img(jax.nn.leaky_relu(x, 0.2))
        return jnp.tanh(x.astype(jnp.float32))
