"""Counting a generator's cost: the analytic MACs per layer (official convention), XLA's cost
analysis, and the section 3.3 normalization overheads (see the package docstring)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.extend import core as jax_core

from clade_jax import configs
from clade_jax.evaluation.complexity.reference import SPADE_HIDDEN, Variant
from clade_jax.layers.clade import CLADE
from clade_jax.layers.conv import Conv2d, Linear, plain_formulation
from clade_jax.layers.spade import SPADE
from clade_jax.models.build import build_generator, count_params
from clade_jax.models.pix2pixhd import ConvTranspose2d


@dataclasses.dataclass(frozen=True)
class LayerCount:
    """The analytic cost of one `Conv2d` / `Linear` module in one forward pass.

    Attributes:
      path: module path inside the model, e.g. ("up_0", "norm_0", "mlp_shared").
      kind: "conv" or "linear".
      kernel: (kh, kw, C_in, C_out) for a conv, (in, out) for a linear layer.
      out_shape: output shape of each call (a module called twice has two).
      macs: multiply-accumulates with the taps on the zero padding counted (official convention).
      macs_valid: multiply-accumulates with only the taps inside the input (XLA's convention).
      params: the module's parameters (kernel and bias).
    """

    path: tuple[str, ...]
    kind: str
    kernel: tuple[int, ...]
    out_shape: tuple[tuple[int, ...], ...]
    macs: int
    macs_valid: int
    params: int


# ----------------------------------------------------------------------------- inputs and models


def variant_config(dataset: str, variant: Variant, arg: str = "") -> ml_collections.ConfigDict:
    """The config of one table row: `variant.arg` joined with the user's `arg`."""
    cfg = configs.load(dataset, ",".join(filter(None, [variant.arg, arg])))
    if variant.instance is not None:
        cfg.data.use_instance = variant.instance
    return cfg


def abstract_generator(config: ml_collections.ConfigDict) -> nnx.Module:
    """The generator of `config` in inference mode, with abstract (unallocated) parameters."""
    model = nnx.eval_shape(lambda: build_generator(config, rngs=nnx.Rngs(0)))
    model.eval()
    return model


def generator_inputs(model: nnx.Module, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract keyword inputs of `model(**inputs)` for a batch of `batch` images.

    Args:
      model: a `Generator` (concrete or abstract).
      batch: images per call.

    Returns:
      {"labels": (N, H, W) int32, and "instance" / "icpe" / "z" where the model uses them}.
    """
    h, w = model.output_size
    out = {"labels": jax.ShapeDtypeStruct((batch, h, w), jnp.int32)}
    if model.use_instance:
        out["instance"] = jax.ShapeDtypeStruct((batch, h, w), jnp.int32)
    if model.use_icpe:
        out["icpe"] = jax.ShapeDtypeStruct((batch, h, w, 2), jnp.float32)
    if model.use_vae:
        out["z"] = jax.ShapeDtypeStruct((batch, model.z_dim), jnp.float32)
    return out


def forward(graphdef, state, inputs):
    """The generator of (graphdef, state) on the inputs dict (what is traced and lowered)."""
    return nnx.merge(graphdef, state)(**inputs)


# ----------------------------------------------------------------------------- analytic count


def _valid_taps(in_size: int, out_size: int, k: int, stride: int, pad: int) -> int:
    """Sum over output positions of the kernel taps that fall inside [0, in_size) (one axis)."""
    return sum(
        sum(1 for j in range(k) if 0 <= o * stride - pad + j < in_size) for o in range(out_size)
    )


def layer_counts(model: nnx.Module, inputs: dict) -> list[LayerCount]:
    """Analytic per-layer MACs of every `Conv2d` / `Linear` in one forward pass.

    The forward is traced with `jax.eval_shape` (abstract parameters are fine) while `nnx.capture`
    records every method's output; the convolution's geometry comes from its kernel, stride and
    padding. This uses no XLA cost model, so it is an independent check of `xla_cost`.

    Args:
      model: the network (e.g. from `abstract_generator`); called as `model(**inputs)`.
      inputs: keyword inputs, arrays or `jax.ShapeDtypeStruct`s.

    Returns:
      One `LayerCount` per module that ran, in module-tree order.
    """
    graphdef, state = nnx.split(model)

    def traced(state, inputs):
        m = nnx.merge(graphdef, state)
        _, captured = nnx.capture(m, nnx.Intermediate, method_outputs=nnx.Intermediate)(**inputs)
        return captured

    captured = jax.eval_shape(traced, state, inputs)
    outputs = {tuple(path): v for path, v in nnx.to_flat_state(captured)}
    rows = []
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, Conv2d | Linear | ConvTranspose2d):
            continue
        key = tuple(str(p) for p in path)
        calls = outputs.get(key + ("__call__",))
        if calls is None:
            continue  # built but not used in this forward (e.g. an unused option)
        shapes = tuple(tuple(o.shape) for o in calls.get_value())
        kernel = tuple(module.kernel.shape)
        params = count_params(module)
        macs = valid = 0
        for shape in shapes:
            if isinstance(module, Linear):
                rows_ = int(np.prod(shape[:-1]))
                macs += rows_ * kernel[0] * kernel[1]
                valid += rows_ * kernel[0] * kernel[1]
                continue
            n, h_out, w_out, _ = shape
            if isinstance(module, ConvTranspose2d):
                # Official convention: MACs per input pixel x k^2 x Cin x Cout (see pix2pixhd.py).
                full, taps_valid = module.macs(h_out, w_out)
                macs += n * full
                valid += n * taps_valid
                continue
            kh, kw, c_in, c_out = kernel
            s, p = module.stride, module.padding
            h_in, w_in = (h_out - 1) * s - 2 * p + kh, (w_out - 1) * s - 2 * p + kw
            macs += n * h_out * w_out * kh * kw * c_in * c_out
            taps = _valid_taps(h_in, h_out, kh, s, p) * _valid_taps(w_in, w_out, kw, s, p)
            valid += n * taps * c_in * c_out
        kind = "linear" if isinstance(module, Linear) else "conv"
        rows.append(LayerCount(key, kind, kernel, shapes, macs, valid, params))
    return rows


# ----------------------------------------------------------------------------- XLA count


def _sub_jaxprs(params: dict) -> Iterable:
    for value in params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, jax_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax_core.Jaxpr):
                yield v


def _equations(jaxpr, names: set[str]) -> Iterable:
    """Every equation of primitive `names` in `jaxpr` and its nested jaxprs (pjit, custom_jvp)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            yield eqn
        for sub in _sub_jaxprs(eqn.params):
            yield from _equations(sub, names)


@functools.cache
def _xla_flops_of(primitive, avals: tuple, params: tuple) -> float:
    fn = functools.partial(primitive.bind, **dict(params))
    return float(jax.jit(fn).lower(*avals).cost_analysis()["flops"])


def xla_cost(model: nnx.Module, inputs: dict, *, compiled: bool = False) -> dict[str, float]:
    """XLA's cost analysis of the jit-compiled forward, in total and for its convolutions alone.

    Args:
      model: the network (abstract parameters are fine: lowering and compiling need shapes only).
      inputs: keyword inputs, arrays or `jax.ShapeDtypeStruct`s.
      compiled: analyse the optimized (compiled) module instead of the lowered one (slow for
        full-size models; within 1% of the lowered count on the tiny configs).

    Returns:
      {"flops": XLA's flops of the whole forward, "conv_flops": XLA's flops of its
      `conv_general_dilated` ops, each lowered alone}. One MAC is 2 flops for XLA.
    """
    graphdef, state = nnx.split(model)
    fn = functools.partial(forward, graphdef)
    # The textbook program: on CPU the layers compute one-hot convolutions as gathers
    # (clade_jax.layers.conv), which XLA would not count as convolutions.
    with plain_formulation():
        lowered = jax.jit(fn).lower(state, inputs)
        closed = jax.make_jaxpr(fn)(state, inputs)
    analysis = (lowered.compile() if compiled else lowered).cost_analysis()
    conv_flops = 0.0
    for eqn in _equations(closed.jaxpr, {"conv_general_dilated"}):
        avals = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
        params = tuple(sorted(eqn.params.items()))
        conv_flops += _xla_flops_of(eqn.primitive, avals, params)
    return {"flops": float(analysis["flops"]), "conv_flops": conv_flops}


# ----------------------------------------------------------------------------- section 3.3


def norm_conv_pairs(model: nnx.Module, layers: Sequence[LayerCount]) -> list[dict]:
    """Each normalization layer with the convolution it feeds (norm_X -> conv_X in a block).

    Layers are matched by the official attribute names (`norm_0` feeds `conv_0`, `norm_1`
    `conv_1`, `norm_s` `conv_s`), whatever their type, so `norm='none'` (identity) backbones
    are paired too.

    Args:
      model: the generator.
      layers: its `layer_counts`.

    Returns:
      One dict per pair: "path" (the norm's), "norm" (the module), "conv" (its `LayerCount`),
      "channels" (features the norm normalizes).
    """
    by_path = {layer.path: layer for layer in layers}
    pairs = []
    for path, module in nnx.iter_modules(model):
        path = tuple(str(p) for p in path)
        if not path or not path[-1].startswith("norm_"):
            continue
        conv = by_path.get(path[:-1] + (path[-1].replace("norm_", "conv_", 1),))
        if conv is None:
            continue
        if isinstance(module, CLADE | SPADE):
            channels = module.param_free_norm.num_features
        else:  # identity: the conv's input (there is no instance-edge channel without CLADE)
            channels = conv.kernel[2]
        pairs.append(dict(path=path, norm=module, conv=conv, channels=channels))
    return pairs


def norm_overhead(model: nnx.Module, layers: Sequence[LayerCount], num_classes: int) -> dict:
    """Section 3.3: extra params and FLOPs of the norms relative to the convs they feed (%).

    Args:
      model: the generator (any norm: the paper's definition only uses its backbone).
      layers: its `layer_counts`.
      num_classes: N_c, the one-hot classes.

    Returns:
      {"paper": {"SPADE": (params %, flops %), "CLADE": (...)}, the paper's definition (see the
      module docstring) evaluated on this backbone; "measured": (params %, flops %) of this
      model's own norm layers relative to their convs (real kernels, biases, per-layer MACs;
      CLADE's gather one op per output element); "pairs": number of norm/conv pairs}.
    """
    layer_by_path = {layer.path: layer for layer in layers}
    pairs = norm_conv_pairs(model, layers)
    p_conv = f_conv = p_spade = f_spade = p_clade = f_clade = 0
    m_norm_p = m_norm_f = m_conv_p = m_conv_f = 0
    for pair in pairs:
        conv, c = pair["conv"], pair["channels"]
        n, h, w, _ = conv.out_shape[0]
        c_in, c_out = conv.kernel[2], conv.kernel[3]
        hw = h * w  # per image
        # The paper's formulas: k_c = k_m = 3 everywhere, no biases.
        p_conv += 9 * c_in * c_out
        f_conv += 9 * c_in * c_out * hw
        p_spade += 9 * (num_classes * SPADE_HIDDEN + 2 * SPADE_HIDDEN * c)
        f_spade += 9 * (num_classes * SPADE_HIDDEN + 2 * SPADE_HIDDEN * c) * hw
        p_clade += 2 * num_classes * c
        f_clade += c * hw
        # Measured on the modules of this model.
        norm = pair["norm"]
        prefix = pair["path"]
        norm_layers = [lyr for p, lyr in layer_by_path.items() if p[: len(prefix)] == prefix]
        m_norm_p += count_params(norm)
        m_norm_f += sum(lyr.macs for lyr in norm_layers) // n
        if isinstance(norm, CLADE):
            m_norm_f += c * hw  # the table gather: one assignment per element, as the paper
        m_conv_p += conv.params
        m_conv_f += conv.macs // n
    pct = lambda a, b: 100.0 * a / b if b else float("nan")
    return {
        "paper": {
            "SPADE": (pct(p_spade, p_conv), pct(f_spade, f_conv)),
            "CLADE": (pct(p_clade, p_conv), pct(f_clade, f_conv)),
        },
        "measured": (pct(m_norm_p, m_conv_p), pct(m_norm_f, m_conv_f)),
        "pairs": len(pairs),
    }
