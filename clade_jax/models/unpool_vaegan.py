"""The feature-focused generator of seed 003's "VAE-GAN" (`model.generator = 'unpool'`), NHWC.

Seed 003 (Gorrepati & Lau, "Semantic Image Synthesis using a Spatially Adaptive feature-focused
VAE-GAN with Switchable Normalization") keeps SPADE's residual blocks but replaces the plain
nearest upsamplings by max-unpooling guided by the max-pool masks of an added VGG-style encoder,
after PhotoWCT (Li et al., ECCV 2018). The report gives no code and its Figures 6-8 are not in
the text we have; the choices below follow its words, quoted.

What the encoder sees: the label map. "In the original SPADE architecture, the generator started
with a heavily downsampled segmentation map input ... Through interpolation we lose potentially
valuable information ... Thus, we seek to preserve more information by downsampling layers", and
"we have learnable ways to compress segmentation maps, a more computationally heavy but more
intelligent way to downsample our map" ("more information about the segmentation map is
included"; the introduction: "we can preserve more information from the map labels"). So the
encoder input is the generator's own semantic input, the one-hot map (+ the instance-edge
channel), at the output resolution; no photo is needed, and inference works exactly like
training. (SPADE's separate image encoder for `--use_vae` is not part of this model.)

What the encoder is: "The architecture of the downsampling layers is the same as that of [11]
[WCT: a VGG19 encoder], with a maxpool mask for later unpooling layers". We use VGG19's layout:
stages of 3x3 convolutions with reflection padding (as the WCT/PhotoWCT VGG encoders), 2, 2, 4,
4, 4 convolutions per stage, each stage closed by a 2x2 stride-2 max pooling that records its
argmax ("maxpool masks, recording the indices of the maximum value in the maxpool region"). VGG19
has five poolings: exactly what takes a 256x256 map to SPADE's 8x8 latent grid. The encoder is
trained from scratch with the rest of the generator (the report calls these layers "learnable"),
so, unlike the pretrained VGG, each convolution is followed by a parameter-free norm before its
ReLU: without one, sixteen plain convolutions with the official xavier(0.02) initialisation
shrink the signal to nothing. The default is the official encoder norm (`norm_E =
spectralinstance`: spectral norm, no bias, InstanceNorm); `encoder_norm` selects another kind
(e.g. "switchable"). VGG's 1x1 colour conv (`conv0`, an artefact of the pretrained weights) is
omitted.

How the masks align with the generator: SPADE's generator upsamples five times (8 -> 16 -> 32 ->
64 -> 128 -> 256 for 'normal'). "we have replaced the plain upsampling layers in the original
SPADE architecture with the unpooling layers ... One notices our architecture keeps the final
upsampling layer, leading into the same final SPADE Resnet block ..., the same ReLU nonlinearity,
and convolutional network. The tanh function is applied in our architecture as well." So the
first four upsamplings become unpoolings and the last (before `up_3`) stays nearest. Upsampling i
(from level i to level i+1) is undone by the pooling that went from level i+1 to level i, so
pooling 5 (16 -> 8) guides the first unpooling and pooling 2 (128 -> 64) the fourth; pooling 1's
mask is unused ("we did not want to create a fully symmetric VAE"). Max-unpooling puts each value
at the position of its window's maximum, per channel, so the encoder stage closed by a pooling has
as many channels as the generator feature that its mask unpools (as in PhotoWCT, whose decoder
mirrors the encoder's widths): from full resolution down, 2nf, 4nf, 8nf, 16nf, 16nf, which is
VGG19's 64-128-256-512-512 progression at twice the width for ngf = 64. The report keeps no
convolutions after the unpoolings ("the convolutions in each SPADE ResBlk layer following our
unpooling layers would be able to accomplish anything the pure convolutions ... might
contribute"): an unpooled tensor goes straight into the next SPADE/CLADE residual block.

What replaces SPADE's `fc`: the encoder's output after its last pooling (16nf channels at the
latent grid) is the tensor `head_0` starts from ("By downsampling this way, and thus creating a
VAE-GAN in the process"): the encoder-decoder is the "VAE"; there is no sampling and no KL term
in the report, so there is none here (`use_vae` is False; `z` and `key` are ignored).

Options beyond the report: `num_unpool` (how many upsamplings become unpoolings; the report's
future work: "experiment with different amounts of unpooling levels"), `encoder_convs` (e.g.
(1, 1, 1, 1, 1) for a light encoder), `encoder_norm`, 'more'/'most' upsampling (one encoder stage
per upsampling). In a config: `model.unpool_num`, `model.unpool_encoder_convs`,
`model.unpool_encoder_norm` (clade_jax/configs/common.py).

Cost (ADE20k 256x256, `python -m clade_jax.evaluation.complexity`): with SPADE norms 175.3 M
parameters and 293.9 G MACs (SPADE: 96.5 M, 181.2 G); with CLADE 150.3 M and 155.0 G. The
encoder adds 80.2 M parameters (mostly its two 16nf-wide stages) and 112.8 G MACs, and the model
drops SPADE's `fc` (1.4 M, 0.09 G).

Everything else (blocks, spectral norm, CLADE / SPADE / switchable norms, ICPE, instance edges,
`conv_img`) is the SPADE / CLADE generator's, reused from `generator.py`.

Pooling helpers: `max_pool_with_indices` and `max_unpool` are jit-friendly (reshape + argmax +
one-hot, no scatter); indices are positions 0..3 inside each 2x2 window (row-major), convertible
to PyTorch's `return_indices` format with `torch_indices`. Ties go to the first maximum, as in
PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clade_jax.layers.conv import Conv2d
from clade_jax.layers.spade import nan_where_invalid, semantic_input
from clade_jax.models.generator import (
    add_resnet_blocks,
    label_pyramid_of,
    set_spade_geometry,
    upsample2x,
)
from clade_jax.models.pix2pixhd import NormConv

VGG19_CONVS = (2, 2, 4, 4, 4)  # convolutions per stage of VGG19 (conv1_x .. conv5_x)


# ----------------------------------------------------------------------------- pooling


def _windows(x: jnp.ndarray) -> jnp.ndarray:
    """(N, H, W, C) -> (N, H/2, W/2, C, 4): each 2x2 window, row-major."""
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"2x2 max pooling needs even sides, got {(h, w)}")
    x = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)


def max_pool_with_indices(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """2x2 stride-2 max pooling that also returns where each maximum was.

    Args:
      x: (N, H, W, C) with H, W even.

    Returns:
      pooled (N, H/2, W/2, C) and indices (N, H/2, W/2, C) int32 in [0, 4): the maximum's
      position in its window, row-major (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right);
      the first maximum on ties (PyTorch's rule). The gradient flows to the maxima only.
    """
    win = _windows(x)  # (N, h, w, C, 4)
    idx = jnp.argmax(win, axis=-1).astype(jnp.int32)
    pooled = jnp.take_along_axis(win, idx[..., None], axis=-1)[..., 0]
    return pooled, idx


def max_unpool(x: jnp.ndarray, indices: jnp.ndarray) -> jnp.ndarray:
    """Inverse of `max_pool_with_indices` (`nn.MaxUnpool2d(2, 2)`): each value goes back to the
    position of its window's maximum, zeros elsewhere.

    Args:
      x: (N, h, w, C) values.
      indices: (N, h, w, C) positions in [0, 4) from `max_pool_with_indices`.

    Returns:
      (N, 2h, 2w, C).
    """
    if x.shape != indices.shape:
        raise ValueError(
            f"unpooling needs x and indices of one shape, got {x.shape} and {indices.shape}"
        )
    n, h, w, c = x.shape
    y = jax.nn.one_hot(indices, 4, dtype=x.dtype) * x[..., None]  # (N, h, w, C, 4)
    y = y.reshape(n, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)  # (N, h, 2, w, 2, C)
    return y.reshape(n, 2 * h, 2 * w, c)


def torch_indices(indices: jnp.ndarray) -> jnp.ndarray:
    """Window positions -> PyTorch's `max_pool2d(return_indices=True)` flat indices `row * W + col`
    into the (H, W) = (2h, 2w) input plane; both (N, h, w, C)."""
    _, h, w, _ = indices.shape
    rows = 2 * jnp.arange(h)[:, None, None] + indices // 2
    cols = 2 * jnp.arange(w)[None, :, None] + indices % 2
    return rows * (2 * w) + cols


# ----------------------------------------------------------------------------- encoder


class LabelEncoder(nnx.Module):
    """VGG-style encoder of the semantic input with max-pool masks (see the module docstring).

    Stage s: `convs[s]` x (reflection pad 1, 3x3 conv, param-free norm, ReLU) to `widths[s]`
    channels, then a 2x2 max pooling with indices.

    Args:
      in_features: semantic input channels (one-hot classes + edge channel).
      widths: output channels of each stage, from full resolution down.
      convs: convolutions per stage.
      norm: param-free norm after each conv ("instance" officially; "none" keeps the conv bias).
      spectral_norm: spectral norm on the convs.
      dtype: compute dtype.
      norm_kwargs: extra `ParamFreeNorm` arguments.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        convs: Sequence[int],
        *,
        norm: str,
        spectral_norm: bool,
        dtype,
        norm_kwargs: dict | None,
        rngs: nnx.Rngs,
    ):
        if len(widths) != len(convs) or min(convs) < 1:
            raise ValueError(f"need >= 1 conv per stage for each width, got {convs} for {widths}")
        self.convs = tuple(convs)
        c_in = in_features
        for s, (width, n_conv) in enumerate(zip(widths, convs, strict=True)):
            for j in range(n_conv):
                conv = Conv2d(
                    c_in,
                    width,
                    3,
                    use_bias=norm == "none",
                    spectral_norm=spectral_norm,
                    dtype=dtype,
                    rngs=rngs,
                )
                layer = NormConv(conv, width, norm=norm, reflect=1, norm_kwargs=norm_kwargs)
                setattr(self, f"conv{s + 1}_{j + 1}", layer)  # VGG's names: conv1_1, conv1_2, ...
                c_in = width

    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
        """x (N, H, W, in) -> (bottleneck (N, H/2^S, W/2^S, widths[-1]), [indices per stage]).

        indices[s] is (N, H/2^(s+1), W/2^(s+1), widths[s]), the mask of stage s's pooling.
        """
        masks = []
        for s, n_conv in enumerate(self.convs):
            for j in range(n_conv):
                x = getattr(self, f"conv{s + 1}_{j + 1}")(x)  # (N, H/2^s, W/2^s, widths[s])
            x, idx = max_pool_with_indices(x)
            masks.append(idx)
        return x, masks


# ----------------------------------------------------------------------------- generator


class UnpoolGenerator(nnx.Module):
    """SPADE / CLADE generator with encoder-guided max-unpooling (seed 003; module docstring).

    Args:
      num_classes: label classes, counting the don't-care class.
      norm: "clade", "spade" or "none" (the residual blocks' norms).
      param_free_norm: "batch", "instance", "switchable" (seed 003) or "none".
      ngf: base width.
      crop_size: output width.
      aspect_ratio: width / height.
      num_upsampling_layers: "normal", "more" or "most" (as the SPADE generator); the encoder has
        one stage per upsampling.
      use_instance: the inputs include an instance map (its edges feed the encoder and the norms).
      icpe: CLADE-ICPE (requires norm="clade").
      spectral_norm: spectral norm on the residual-block and encoder convolutions.
      num_unpool: how many upsamplings (the first, deepest ones) become unpoolings; default all
        but the last, as in the report.
      encoder_convs: convolutions per encoder stage, from full resolution down; default VGG19's
        (2, 2, 4, 4, 4), continued with 4s for 'more' / 'most'.
      encoder_norm: param-free norm of the encoder ("instance", the official norm_E).
      z_dim: unused (no latent code); stored for the generators' uniform interface.
      dtype: compute dtype (parameters and normalization statistics stay float32).
      spade_windows: the SPADE layers' `windows` (`Generator`'s).
      norm_kwargs: extra arguments of the param-free norms (e.g. switchable_batch), used by the
        residual blocks and, when it is the same kind, the encoder.

    Call: `G(labels, *, z=None, instance=None, icpe=None, key=None) -> (N, H, W, 3)` in [-1, 1],
    labels (N, H, W) int (resized to `output_size` for the encoder if needed), instance (N, H, W),
    icpe (N, H, W, 2). `z` and `key` are ignored: the model has no latent code.
    """

    use_vae = False

    def __init__(
        self,
        num_classes: int,
        *,
        norm: str = "spade",
        param_free_norm: str = "batch",
        ngf: int = 64,
        crop_size: int = 256,
        aspect_ratio: float = 1.0,
        num_upsampling_layers: str = "normal",
        use_instance: bool = False,
        icpe: bool = False,
        spectral_norm: bool = True,
        num_unpool: int | None = None,
        encoder_convs: Sequence[int] | None = None,
        encoder_norm: str = "instance",
        z_dim: int = 0,
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
        self.z_dim = z_dim
        self.num_unpool = self.num_up - 1 if num_unpool is None else num_unpool
        if not 0 <= self.num_unpool <= self.num_up:
            raise ValueError(f"num_unpool must be in [0, {self.num_up}], got {num_unpool}")
        # Channels of the tensor at each upsampling, in forward order (see `__call__`): the
        # outputs of head_0, [G_middle_0,] G_middle_1, up_0, up_1, up_2[, up_3].
        more = num_upsampling_layers in ("more", "most")
        up_channels = [16 * nf] + [16 * nf] * more + [16 * nf, 8 * nf, 4 * nf, 2 * nf]
        if num_upsampling_layers == "most":
            up_channels.append(nf)
        self.up_channels = tuple(up_channels)
        convs = encoder_convs
        if convs is None:
            convs = (VGG19_CONVS + (4,) * self.num_up)[: self.num_up]
        if len(convs) != self.num_up:
            raise ValueError(f"encoder_convs needs {self.num_up} stages, got {tuple(convs)}")
        semantic_nc = num_classes + (1 if use_instance else 0)
        enc_kwargs = norm_kwargs if encoder_norm == param_free_norm else None
        self.encoder = LabelEncoder(
            semantic_nc,
            self.up_channels[::-1],  # stage s (full resolution down) mirrors upsampling -1-s
            convs,
            norm=encoder_norm,
            spectral_norm=spectral_norm,
            dtype=dtype,
            norm_kwargs=enc_kwargs,
            rngs=rngs,
        )
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
        """labels (N, H, W) int, instance (N, H, W) int, icpe (N, H, W, 2) -> (N, H, W, 3)."""
        del z, key  # no latent code (see the module docstring)
        sizes = [(self.sh * 2**k, self.sw * 2**k) for k in range(self.num_up + 1)]
        pyramid = label_pyramid_of(self, labels, instance, icpe)
        top = pyramid[sizes[-1]]
        seg = semantic_input(top.labels, self.num_classes, top.edges, self.dtype)
        seg = nan_where_invalid(seg, top.labels, self.num_classes)  # (N, H, W, semantic_nc)
        x, masks = self.encoder(seg)  # x (N, sh, sw, 16nf); masks[s] at level num_up - 1 - s
        step = 0

        def up(x):  # the step-th upsampling of the forward pass
            nonlocal step
            if step < self.num_unpool:
                x = max_unpool(x, masks[self.num_up - 1 - step])
            else:
                x = upsample2x(x)
            step += 1
            return x

        c = lambda k: pyramid[sizes[k]]
        x = self.head_0(x, c(0))
        x = self.G_middle_0(up(x), c(1))
        if self.num_upsampling_layers in ("more", "most"):
            x = up(x)
        x = self.G_middle_1(x, c(step))
        for name in ("up_0", "up_1", "up_2", "up_3") + (
            ("up_4",) if self.num_upsampling_layers == "most" else ()
        ):
            x = up(x)
            x = getattr(self, name)(x, c(step))
        x = self.conv_img(jax.nn.leaky_relu(x, 0.2))
        return jnp.tanh(x.astype(jnp.float32))
