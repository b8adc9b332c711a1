"""Official PyTorch SPADE / CLADE checkpoints -> clade_jax NNX modules.

The official code stores a network as a torch `state_dict` (NCHW kernels `(out, in, kh, kw)`,
linear weights `(out, in)`, spectral norm as `weight_orig` / `weight_u` / `weight_v`) and its
options in `opt.txt`. `from_official(state, options, kind)` builds our module from the official
option names and copies every array in, with an explicit name map:

    ours (NNX path)                               official (torch name)
    <block>.conv_0.kernel (kh,kw,in,out)          <block>.conv_0.weight_orig (out,in,kh,kw)
    <block>.conv_0.u / .v                         <block>.conv_0.weight_u / weight_v
    <block>.norm_0.class_affine.scale / shift     <block>.norm_0.class_specified_affine.weight/bias
    <block>.norm_0.icpe_scale / icpe_shift        ...class_specified_affine.dist_conv_w/dist_conv_b
    <block>.norm_0.mlp_shared                     <block>.norm_0.mlp_shared.0
    <block>.norm_0.param_free_norm.running_*      <block>.norm_0.param_free_norm.running_*
    layerK.conv (encoder)                         layerK.0
    discriminator_i.modelJ.conv                   discriminator_i.modelJ.0 (.0.0 with spectral norm)

Two linear layers also change their feature order from NCHW to NHWC flattening: the VAE
generator's `fc` output (viewed as (16nf, sh, sw) officially) and the encoder heads' input.
`num_batches_tracked` is ignored (the momentum update does not use it). The networks are built
from the options by way of a config (`config_from_options`, then `clade_jax.models.build`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from clade_jax import configs
from clade_jax.layers.clade import CLADE, ClassAffine
from clade_jax.layers.conv import Conv2d, Linear
from clade_jax.layers.normalization import ParamFreeNorm
from clade_jax.layers.spade import SPADE
from clade_jax.models.build import build_discriminator, build_encoder, build_generator
from clade_jax.models.discriminator import DLayer
from clade_jax.models.encoder import ConvEncoder, EncoderLayer
from clade_jax.models.generator import Generator

IGNORED_SUFFIXES = ("num_batches_tracked",)


# ----------------------------------------------------------------------------- options


def read_opt_txt(path: str) -> dict:
    """Parse the official `opt.txt` (`name: value [default: x]` lines) into typed values."""
    options = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"^\s*([A-Za-z_][\w]*)\s*:\s*(.*?)\s*(\[default:.*\])?\s*$", line)
            if not m:
                continue
            options[m.group(1)] = _parse_value(m.group(2))
    if not options:
        raise ValueError(f"{path}: no 'name: value' lines found; is this an official opt.txt?")
    return options


def _parse_value(text: str):
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _opt(options: Mapping, name: str, default=None):
    if name in options:
        return options[name]
    if default is None:
        raise ValueError(f"official options lack {name!r}")
    return default


def num_classes_from(options: Mapping) -> int:
    """label_nc plus the don't-care class when `contain_dontcare_label` is set."""
    return int(_opt(options, "label_nc")) + (1 if options.get("contain_dontcare_label") else 0)


def param_free_norm_from(norm_g: str) -> str:
    """'spectralspadesyncbatch3x3' -> 'batch'; '...spadeinstance3x3' -> 'instance'."""
    m = re.search(r"spade(\D+)(\d)x\d", norm_g)
    if not m:
        raise ValueError(
            f"unsupported norm_G {norm_g!r}: expected e.g. 'spectralspadesyncbatch3x3'"
        )
    kind = {"syncbatch": "batch", "batch": "batch", "instance": "instance"}.get(m.group(1))
    if kind is None or m.group(2) != "3":
        raise ValueError(
            f"unsupported norm_G {norm_g!r}: param-free norm {m.group(1)!r}, kernel {m.group(2)}"
        )
    return kind


DATASET_CONFIGS = {
    "ade20k": "ade20k",
    "coco": "coco_stuff",
    "cityscapes": "cityscapes",
    "custom": "custom",
}


def config_from_options(options: Mapping, source: str = "the options") -> ml_collections.ConfigDict:
    """Our config for the official options (dataset preset first, then every option that has a
    counterpart). `models.build` turns it into modules: the one route from options to networks.

    Args:
      options: the official options (`read_opt_txt`); no `dataset_mode` means "custom".
      source: where they come from (the opt.txt path), for error messages.

    Raises:
      ValueError: a `dataset_mode` without a clade_jax preset, or an option without a clade_jax
        counterpart (netG, norm_G), named.
    """
    mode = options.get("dataset_mode", "custom")
    if mode not in DATASET_CONFIGS:
        # Not a silent fallback: another data set's checkpoint would convert with the wrong
        # label conventions. A data set of one's own is "custom" (classes from label_nc).
        raise ValueError(
            f"dataset_mode={mode!r} in {source} has no clade_jax preset; known modes: "
            f"{', '.join(DATASET_CONFIGS)} (for another data set set dataset_mode to 'custom': "
            "the classes then come from label_nc / contain_dontcare_label)"
        )
    c = configs.load(DATASET_CONFIGS[mode])
    d, m = c.data, c.model
    d.num_classes = num_classes_from(options)
    d.dontcare_label = int(options["label_nc"]) if options.get("contain_dontcare_label") else -1
    d.use_instance = not options.get("no_instance", False)
    d.icpe = bool(options.get("add_dist", False))
    d.crop_size = int(options.get("crop_size", d.crop_size))
    d.load_size = int(options.get("load_size", d.load_size))
    d.aspect_ratio = float(options.get("aspect_ratio", d.aspect_ratio))
    preprocess = options.get("preprocess_mode", d.preprocess)
    d.preprocess = "fixed" if preprocess.startswith("fixed") else "resize_and_crop"
    d.flip = not options.get("no_flip", False)
    if options.get("dataroot"):
        d.root = str(options["dataroot"])
    if options.get("netG", "spade") != "spade":
        raise ValueError(
            f"unsupported netG {options['netG']!r}: only the SPADE/CLADE generator converts"
        )
    m.generator = "spade_clade"
    m.norm = options.get("norm_mode", "spade")
    norm_g = options.get("norm_G", "spectralspadesyncbatch3x3")
    m.param_free_norm = param_free_norm_from(norm_g)
    m.spectral_norm = "spectral" in norm_g
    m.ngf = int(options.get("ngf", m.ngf))
    m.num_upsampling_layers = options.get("num_upsampling_layers", m.num_upsampling_layers)
    m.use_vae = bool(options.get("use_vae", False))
    m.z_dim = int(options.get("z_dim", m.z_dim))
    m.ndf = int(options.get("ndf", m.ndf))
    m.n_layers_D = int(options.get("n_layers_D", m.n_layers_D))
    m.num_D = int(options.get("num_D", m.num_D))
    c.loss.lambda_feat = float(options.get("lambda_feat", c.loss.lambda_feat))
    c.loss.lambda_vgg = (
        0.0 if options.get("no_vgg_loss") else float(options.get("lambda_vgg", c.loss.lambda_vgg))
    )
    c.loss.lambda_kld = float(options.get("lambda_kld", c.loss.lambda_kld))
    lr = float(options.get("lr", 2e-4))
    if options.get("no_TTUR", False):
        c.optim.lr_g = c.optim.lr_d = lr
        c.optim.beta1, c.optim.beta2 = 0.5, 0.999
    else:
        c.optim.lr_g, c.optim.lr_d = lr / 2, lr * 2
        c.optim.beta1 = float(options.get("beta1", 0.0))
        c.optim.beta2 = float(options.get("beta2", 0.9))
    c.batch_size = int(options.get("batchSize", c.batch_size))
    c.num_epochs = int(options.get("niter", c.num_epochs))
    c.num_decay_epochs = int(options.get("niter_decay", c.num_decay_epochs))
    return c


def check_discriminator_options(options: Mapping) -> None:
    """The official discriminator options `MultiscaleDiscriminator` reproduces, or ValueError."""
    if (
        options.get("netD", "multiscale") != "multiscale"
        or options.get("netD_subarch", "n_layer") != "n_layer"
    ):
        raise ValueError("only the multiscale n_layer discriminator converts")
    if options.get("norm_D", "spectralinstance") != "spectralinstance":
        raise ValueError(f"unsupported norm_D {options.get('norm_D')!r} (need spectralinstance)")


def check_encoder_options(options: Mapping) -> None:
    """The official encoder options our `ConvEncoder` reproduces (its width is ngf: the official
    --nef option is unused), or ValueError."""
    if options.get("norm_E", "spectralinstance") != "spectralinstance":
        raise ValueError(f"unsupported norm_E {options.get('norm_E')!r} (need spectralinstance)")


# ----------------------------------------------------------------------------- name map


def _conv_kernel(w):
    return np.transpose(w, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)


def _identity(w):
    return w


def _linear_kernel(w):
    return np.transpose(w)  # (out, in) -> (in, out)


def _chw_to_hwc_out(c: int, h: int, w: int) -> tuple[Callable, Callable]:
    """Linear whose output is viewed as (c, h, w) officially, (h, w, c) here."""

    def kernel(wt):  # (c*h*w, in)
        return wt.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(c * h * w, -1).T

    def bias(b):
        return b.reshape(c, h, w).transpose(1, 2, 0).reshape(-1)

    return kernel, bias


def _chw_to_hwc_in(c: int, h: int, w: int) -> Callable:
    """Linear whose input is an NCHW flatten officially, NHWC here."""

    def kernel(wt):  # (out, c*h*w)
        return wt.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(wt.shape[0], -1).T

    return kernel


def _torch_prefix(path: tuple, model: nnx.Module) -> str:
    """Official module name of the module at `path` (a tuple of attribute names)."""
    names, node = [], model
    for part in path:
        child = getattr(node, part)
        if isinstance(node, CLADE) and part == "class_affine":
            names.append("class_specified_affine")
        elif isinstance(node, CLADE) and part in ("icpe_scale", "icpe_shift"):
            names.append(
                "class_specified_affine.dist_conv_" + ("w" if part == "icpe_scale" else "b")
            )
        elif isinstance(node, SPADE) and part == "mlp_shared":
            names.append("mlp_shared.0")
        elif isinstance(node, EncoderLayer) and part == "conv":
            names.append("0")
        elif isinstance(node, DLayer) and part == "conv":
            names.append("0.0" if node.norm is not None else "0")
        else:
            names.append(str(part))
        node = child
    return ".".join(names)


def official_name_map(model: nnx.Module) -> dict[str, tuple[tuple, Callable]]:
    """{official torch name: (our variable path, torch array -> our array)} for every variable."""
    out = {}
    special = {}
    if isinstance(model, Generator) and model.use_vae:
        special[("fc",)] = _chw_to_hwc_out(16 * model.ngf, model.sh, model.sw)
    if isinstance(model, ConvEncoder):
        side = 256 // 2**model.num_layers
        c = model.fc_mu.kernel.shape[0] // (side * side)
        for head in ("fc_mu", "fc_var"):
            special[(head,)] = (_chw_to_hwc_in(c, side, side), _identity)
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        prefix = _torch_prefix(path, model)
        dot = prefix + "." if prefix else ""
        if isinstance(node, Conv2d):
            kname = "weight_orig" if node.spectral_norm else "weight"
            out[dot + kname] = (path + ("kernel",), _conv_kernel)
            if node.bias is not None:
                out[dot + "bias"] = (path + ("bias",), _identity)
            if node.spectral_norm:
                out[dot + "weight_u"] = (path + ("u",), _identity)
                out[dot + "weight_v"] = (path + ("v",), _identity)
        elif isinstance(node, Linear):
            kfn, bfn = special.get(path, (_linear_kernel, _identity))
            out[dot + "weight"] = (path + ("kernel",), kfn)
            out[dot + "bias"] = (path + ("bias",), bfn)
        elif isinstance(node, ClassAffine):
            out[dot + "weight"] = (path + ("scale",), _identity)
            out[dot + "bias"] = (path + ("shift",), _identity)
        elif isinstance(node, ParamFreeNorm) and node.kind == "batch":
            out[dot + "running_mean"] = (path + ("running_mean",), _identity)
            out[dot + "running_var"] = (path + ("running_var",), _identity)
        elif isinstance(node, ParamFreeNorm) and node.kind == "switchable":
            raise ValueError("switchable normalization has no official checkpoint format")
    return out


# ----------------------------------------------------------------------------- loading


def build(
    options: Mapping, kind: str = "G", *, rngs: nnx.Rngs | None = None, dtype=jnp.float32
) -> nnx.Module:
    """A freshly initialised (official init) network of `kind` "G", "D" or "E".

    The options become a config (`config_from_options`) and `clade_jax.models.build` builds the
    network from it, exactly as training and a converted workdir do.
    """
    if kind not in ("G", "D", "E"):
        raise ValueError(f"kind must be 'G', 'D' or 'E', got {kind!r}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    config = config_from_options(options)
    config.compute_dtype = jnp.dtype(dtype).name
    if kind == "G":
        return build_generator(config, rngs=rngs)
    if kind == "D":
        check_discriminator_options(options)
        return build_discriminator(config, rngs=rngs)
    check_encoder_options(options)
    config.model.use_vae = True  # an encoder's options may come without the generator's use_vae
    return build_encoder(config, rngs=rngs)


def load_official_state(
    model: nnx.Module, state: Mapping[str, np.ndarray], source: str = "state"
) -> None:
    """Copy an official state dict into `model` in place; every mismatch is reported at once."""
    name_map = official_name_map(model)
    given = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    unknown = sorted(set(given) - set(name_map))
    missing = sorted(set(name_map) - set(given))
    problems = []
    if unknown:
        problems.append(f"unknown names: {unknown}")
    if missing:
        problems.append(f"missing names: {missing}")
    updates = {}
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for name, (path, fn) in name_map.items():
        if name not in given:
            continue
        value = np.asarray(fn(np.asarray(given[name], dtype=np.float32)))
        expected = flat[path].shape
        if value.shape != expected:
            problems.append(
                f"{name}: official shape {np.shape(given[name])} does not fit "
                f"{'.'.join(map(str, path))} {expected} for these options"
            )
            continue
        updates[path] = value
    if problems:
        raise ValueError(f"{source} does not match the options:\n  " + "\n  ".join(problems))
    for path, value in updates.items():
        flat[path].set_value(jnp.asarray(value))


def from_official(
    state: Mapping[str, np.ndarray] | None, options: Mapping, kind: str = "G", *, dtype=jnp.float32
) -> nnx.Module:
    """Build the network of `kind` ("G", "D", "E") from official options and weights.

    Args:
      state: official torch state dict as {name: array}, or None for a freshly initialised model
        (official init), so that `nnx.eval_shape(lambda: from_official(None, options))` counts
        parameters without allocating.
      options: official option names and values (an `opt.txt` or the fixtures' options).
      kind: "G" generator, "D" multiscale discriminator, "E" VAE encoder.
      dtype: compute dtype.

    Returns:
      The NNX module, in training mode (call `.eval()` for inference as in PyTorch).
    """
    model = build(options, kind, dtype=dtype)
    if state is not None:
        load_official_state(model, state, source=f"official {kind} state")
    return model
