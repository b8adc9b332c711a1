"""The pix2pixHD global generator as the official SPADE code builds it (`--netG pix2pixhd`), NHWC.

This is the Pix2pixHD baseline of the SPADE and CLADE papers (CLADE Table 3: 182.9 M parameters on
ADE20k). Structure with the official defaults (`--resnet_n_downsample 4`, `--resnet_n_blocks 9`,
`--resnet_kernel_size 3`, `--resnet_initial_kernel_size 7`), nf = ngf, sizes at 256x256:

    conv_in     reflect-pad 3, 7x7 conv  semantic_nc -> nf        256x256   norm, ReLU
    down_0..3   3x3 conv stride 2 pad 1  nf -> 2nf -> ... -> 16nf  128 .. 16  norm, ReLU
    block_0..8  ResnetBlock(16nf)                                 16x16
    up_0..3     3x3 ConvTranspose2d s2 p1 output_padding 1        32 .. 256  norm, ReLU
                16nf -> 8nf -> ... -> nf
    conv_out    reflect-pad 3, 7x7 conv  nf -> 3 (bias, no norm, no SN), tanh

`ResnetBlock` (official `architecture.ResnetBlock`, pix2pixHD's):
`x + norm(conv(pad(ReLU(norm(conv(pad(x)))))))` with reflection padding 1 before each 3x3 conv,
ReLU only between the two convolutions and no activation after the sum.

"norm" is `get_nonspade_norm_layer(opt, norm_G)` with `norm_G = 'spectralinstance'`: every conv
and transposed conv except `conv_out` is spectral-normalized, its bias is removed ("meaningless
since it has no effect after normalization") and it is followed by `InstanceNorm2d(affine=False)`.
Note: `Pix2PixHDGenerator.modify_commandline_options` sets the default `norm_G` to `'instance'`,
with which the official `get_nonspade_norm_layer` fails (its `subnorm_type` is only bound for
'spectral...' values), so the official model can only be built with an explicit
`--norm_G spectralinstance`; the parameter count is the same with or without spectral norm.

The semantic input is the one-hot label map (+ the instance-edge channel), as for the SPADE
generator. The network is fully convolutional: any input whose sides are multiples of
2**n_downsample works; `crop_size` / `aspect_ratio` only define `output_size` for callers that
need the nominal size (complexity counts, synthesis).

`ConvTranspose2d` implements PyTorch's transposed convolution (kernel layout and spectral norm:
see its docstring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clade_jax.layers.conv import Conv2d
from clade_jax.layers.labels import instance_edges
from clade_jax.layers.normalization import ParamFreeNorm


def reflect_pad(x: jnp.ndarray, pad: int) -> jnp.ndarray:
    """`nn.ReflectionPad2d(pad)` on NHWC: mirror without repeating the edge pixel."""
    if pad == 0:
        return x
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


class ConvTranspose2d(Conv2d):
    """PyTorch's `nn.ConvTranspose2d(in, out, k, stride, padding, output_padding)`, NHWC.

    Output size per axis: `(H - 1) * stride - 2 * padding + k + output_padding` (2H for the
    pix2pixHD setting k=3, stride 2, padding 1, output_padding 1). Each input pixel scatters
    `x[q] * W[:, :, a]` into output position `q * stride - padding + a`.

    Kernel layout: `kernel[a, b, i, o] = torch_weight[i, o, a, b]` (torch stores (in, out, kh, kw)
    for transposed convs; the conversion is `np.transpose(w, (2, 3, 0, 1))`). The forward is the
    equivalent direct convolution: input dilated by `stride` (`lhs_dilation`), padded by
    `(k - 1 - padding, k - 1 - padding + output_padding)`, with the spatially flipped kernel.

    Spectral norm follows `torch.nn.utils.spectral_norm`, which uses `dim=1` for ConvTranspose: the
    matrix is `torch_weight.permute(1, 0, 2, 3).reshape(out, -1)`, i.e. `(out, in * kh * kw)`, so
    `u` is (out,) and `v` is (in * kh * kw,) in torch's order, interchangeable with the official
    `weight_u` / `weight_v`. Training forwards run one power iteration and store u, v; evaluation
    (`use_running_average=True`, set by `model.eval()`) uses the stored vectors.

    Init: xavier-normal(0.02), as the official `init_weights` (xavier's fans are symmetric, so the
    transposed layout does not change the std); zero bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 2,
        padding: int = 1,
        output_padding: int = 1,
        use_bias: bool = True,
        spectral_norm: bool = False,
        dtype=jnp.float32,
        use_running_average: bool = False,
        rngs: nnx.Rngs,
    ):
        if not 0 <= output_padding < stride:
            raise ValueError(f"output_padding must be in [0, stride), got {output_padding}")
        # Same parameters, init and spectral norm as Conv2d: with the (kh, kw, in, out) layout
        # above, Conv2d's torch matrix (out, in * kh * kw) is exactly torch's dim=1 matrix here.
        super().__init__(
            in_features,
            out_features,
            kernel_size,
            stride=stride,
            padding=padding,
            use_bias=use_bias,
            spectral_norm=spectral_norm,
            dtype=dtype,
            use_running_average=use_running_average,
            rngs=rngs,
        )
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.output_padding = output_padding

    def macs(self, out_height: int, out_width: int) -> tuple[int, int]:
        """Multiply-accumulates of one image whose output is (out_height, out_width).

        Returns `(macs, macs_valid)`: `macs` is every tap of the scatter, `H_in * W_in * kh * kw
        * C_in * C_out` (the official-code measurement's convention: each input pixel meets each
        kernel tap once, including taps that fall outside the output); `macs_valid` counts only
        the taps that land inside the output, which is what XLA's cost analysis reports for the
        dilated convolution (it skips the inserted zeros and the padding). Counting the
        equivalent direct convolution per output pixel (thop's `count_convNd` on ConvTranspose2d,
        the CLADE paper's Table 3) gives `H_out * W_out * kh * kw * C_in * C_out`, 4x `macs` here.
        """
        k, s, p, op = self.kernel_size, self.stride, self.padding, self.output_padding
        h_in = (out_height - op - k + 2 * p) // s + 1
        w_in = (out_width - op - k + 2 * p) // s + 1
        taps = lambda n_in, n_out: sum(
            1 for q in range(n_in) for a in range(k) if 0 <= q * s - p + a < n_out
        )
        c = self.in_features * self.out_features
        return h_in * w_in * k * k * c, taps(h_in, out_height) * taps(w_in, out_width) * c

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """Spatial output size for an input of (height, width)."""
        f = lambda n: (n - 1) * self.stride - 2 * self.padding + self.kernel_size
        return f(height) + self.output_padding, f(width) + self.output_padding

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: (N, H, W, in) -> (N, H', W', out) in the compute dtype (H' = `output_shape`)."""
        k, p, op = self.kernel_size, self.padding, self.output_padding
        lo, hi = k - 1 - p, k - 1 - p + op
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.weight()[::-1, ::-1].astype(self.dtype),  # flipped taps, (kh, kw, in, out)
            window_strides=(1, 1),
            padding=((lo, hi), (lo, hi)),
            lhs_dilation=(self.stride, self.stride),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class NormConv(nnx.Module):
    """`get_nonspade_norm_layer(norm_G)(conv)` followed by the activation the official code puts
    after it: optional spectral norm, no bias when a norm follows, param-free norm, optional ReLU.

    `reflect` is the `nn.ReflectionPad2d` in front of the conv (the conv itself then pads nothing);
    `norm_kwargs` go to `ParamFreeNorm` (e.g. switchable_batch).
    """

    def __init__(
        self,
        conv: nnx.Module,
        num_features: int,
        *,
        norm: str,
        reflect: int = 0,
        relu: bool = True,
        norm_kwargs: dict | None = None,
    ):
        self.conv = conv
        self.norm = ParamFreeNorm(num_features, norm, **(norm_kwargs or {}))
        self.reflect = reflect
        self.relu = relu

    def __call__(self, x, *, labels=None, num_classes: int = 0) -> jnp.ndarray:
        """x (N, H, W, C); with `labels=` (N, H, W) int the input is `concat([one_hot(labels),
        x])` poisoned with NaN at invalid labels, computed without the one-hot tensor
        (`Conv2d`'s `labels=`; reflecting the labels reflects the one-hot map)."""
        if labels is None:
            y = self.conv(reflect_pad(x, self.reflect))
        else:
            labels = reflect_pad(labels[..., None], self.reflect)[..., 0]
            x = None if x is None else reflect_pad(x, self.reflect)
            y = self.conv(x, labels=labels, num_classes=num_classes, invalid="nan")
        y = self.norm(y)
        return jax.nn.relu(y) if self.relu else y


class ResnetBlock(nnx.Module):
    """pix2pixHD residual block: `x + N(conv(pad(ReLU(N(conv(pad(x)))))))` (module docstring)."""

    def __init__(
        self,
        dim: int,
        *,
        kernel_size: int,
        norm: str,
        spectral_norm: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        pad = (kernel_size - 1) // 2
        conv = lambda: Conv2d(
            dim,
            dim,
            kernel_size,
            use_bias=norm == "none",
            spectral_norm=spectral_norm,
            dtype=dtype,
            rngs=rngs,
        )
        self.conv_0 = NormConv(conv(), dim, norm=norm, reflect=pad, relu=True)
        self.conv_1 = NormConv(conv(), dim, norm=norm, reflect=pad, relu=False)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return x + self.conv_1(self.conv_0(x))


class Pix2PixHDGenerator(nnx.Module):
    """pix2pixHD global generator (official SPADE `Pix2PixHDGenerator`, norm_G spectralinstance).

    Args:
      num_classes: label classes, counting the don't-care class (ADE20k 151, COCO-Stuff 183,
        Cityscapes 35).
      ngf: base width (64 officially).
      use_instance: the inputs include an instance map; its edge map is the last input channel.
      n_downsample: stride-2 convs (and transposed convs) (`--resnet_n_downsample`, 4).
      n_blocks: residual blocks at the bottleneck (`--resnet_n_blocks`, 9).
      kernel_size: residual-block kernel (`--resnet_kernel_size`, 3).
      initial_kernel_size: first conv's kernel (`--resnet_initial_kernel_size`, 7).
      spectral_norm: spectral norm on every conv but the last ('spectral' prefix of norm_G).
      norm: the norm after each conv but the last: "instance" (official), or any param-free kind
        of `ParamFreeNorm` ("none" keeps the conv biases, as the official `norm_G='spectral'`).
        The official 'batch' variant has affine BatchNorm parameters, which these norms lack.
      crop_size: nominal output width (only for `output_size`).
      aspect_ratio: width / height (only for `output_size`).
      z_dim: unused (no latent code); stored for the generators' uniform interface.
      dtype: compute dtype (parameters and normalization statistics stay float32).

    Call: `G(labels, *, z=None, instance=None, icpe=None, key=None) -> (N, H, W, 3)` in [-1, 1];
    `labels` (N, H, W) int, `instance` (N, H, W) int. pix2pixHD has no latent code and no ICPE:
    `z`, `icpe` and `key` are accepted for a uniform generator interface and ignored (the official
    `forward(input, z=None)` ignores z too).
    """

    use_vae = False
    use_icpe = False

    def __init__(
        self,
        num_classes: int,
        *,
        ngf: int = 64,
        use_instance: bool = False,
        n_downsample: int = 4,
        n_blocks: int = 9,
        kernel_size: int = 3,
        initial_kernel_size: int = 7,
        spectral_norm: bool = True,
        norm: str = "instance",
        crop_size: int = 256,
        aspect_ratio: float = 1.0,
        z_dim: int = 0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_classes = num_classes
        self.ngf = ngf
        self.use_instance = use_instance
        self.n_downsample = n_downsample
        self.z_dim = z_dim
        self.dtype = dtype
        # The bottleneck grid, named like the SPADE generator's latent grid.
        self.sw = crop_size // 2**n_downsample
        self.sh = round(self.sw / aspect_ratio)
        semantic_nc = num_classes + (1 if use_instance else 0)
        bias = norm == "none"  # get_nonspade_norm_layer removes the bias before a norm
        conv = lambda i, o, k, s, p: Conv2d(
            i,
            o,
            k,
            stride=s,
            padding=p,
            use_bias=bias,
            spectral_norm=spectral_norm,
            dtype=dtype,
            rngs=rngs,
        )
        k0 = initial_kernel_size
        self.conv_in = NormConv(conv(semantic_nc, ngf, k0, 1, 0), ngf, norm=norm, reflect=k0 // 2)
        # Named attributes (down_i, block_i, up_i) rather than lists: readable state paths.
        self.n_blocks = n_blocks
        mult = 1
        for i in range(n_downsample):
            c = ngf * mult
            setattr(self, f"down_{i}", NormConv(conv(c, 2 * c, 3, 2, 1), 2 * c, norm=norm))
            mult *= 2
        for i in range(n_blocks):
            block = ResnetBlock(
                ngf * mult,
                kernel_size=kernel_size,
                norm=norm,
                spectral_norm=spectral_norm,
                dtype=dtype,
                rngs=rngs,
            )
            setattr(self, f"block_{i}", block)
        for i in range(n_downsample):
            c = ngf * mult
            tconv = ConvTranspose2d(
                c,
                c // 2,
                3,
                stride=2,
                padding=1,
                output_padding=1,
                use_bias=bias,
                spectral_norm=spectral_norm,
                dtype=dtype,
                rngs=rngs,
            )
            setattr(self, f"up_{i}", NormConv(tconv, c // 2, norm=norm))
            mult //= 2
        self.conv_out = Conv2d(ngf * mult, 3, 7, padding=0, dtype=dtype, rngs=rngs)

    @property
    def output_size(self) -> tuple[int, int]:
        """Nominal (height, width) of the output (any multiple of 2**n_downsample works)."""
        return self.sh * 2**self.n_downsample, self.sw * 2**self.n_downsample

    def __call__(
        self,
        labels: jnp.ndarray,
        *,
        z: jnp.ndarray | None = None,
        instance: jnp.ndarray | None = None,
        icpe: jnp.ndarray | None = None,
        key: jax.Array | None = None,
    ) -> jnp.ndarray:
        """labels (N, H, W) int, instance (N, H, W) int -> (N, H, W, 3) float32 in [-1, 1]."""
        del z, icpe, key  # no latent code, no ICPE (see the class docstring)
        if self.use_instance and instance is None:
            raise ValueError("this generator was built with use_instance=True: pass instance=")
        h, w = labels.shape[1:3]
        f = 2**self.n_downsample
        if h % f or w % f:
            raise ValueError(f"label map sides must be multiples of {f}, got {(h, w)}")
        edges = instance_edges(instance) if self.use_instance else None
        # conv_in(semantic_input(labels, edges)) with NaN at invalid labels, without the one-hot
        rest = None if edges is None else edges[..., None].astype(self.dtype)
        x = self.conv_in(rest, labels=labels, num_classes=self.num_classes)  # (N, H, W, nf)
        n = self.n_downsample
        for i in range(n):
            x = getattr(self, f"down_{i}")(x)  # (N, H/2^(i+1), W/2^(i+1), nf * 2^(i+1))
        for i in range(self.n_blocks):
            x = getattr(self, f"block_{i}")(x)  # (N, H/2^n, W/2^n, nf * 2^n)
        for i in range(n):
            x = getattr(self, f"up_{i}")(x)  # (N, H/2^(n-i-1), W/2^(n-i-1), nf * 2^(n-i-1))
        x = self.conv_out(reflect_pad(x, 3))  # (N, H, W, 3)
        return jnp.tanh(x.astype(jnp.float32))
