"""Model complexity: the CLADE paper's Table 3 (params, MACs, runtime) and section 3.3 overheads.

    python -m clade_jax.evaluation.complexity --configs=ade20k,coco_stuff,cityscapes [--runtime]

prints, for every dataset config and generator variant (SPADE, CLADE, CLADE-ICPE, and CLADE
without the instance map where the dataset has one), the generator's parameters, its MACs counted
three ways, optionally the measured runtime per image on the current device, and the published
values beside them; then the normalization overheads of the paper's section 3.3.

How the counts are made (and why three of them)
-----------------------------------------------
* **MACs (official convention)** — `layer_counts`: the forward is traced abstractly
  (`jax.eval_shape`, nothing is allocated) with `nnx.capture` recording the output shape of every
  `Conv2d` / `Linear` module; a convolution costs `H_out * W_out * kh * kw * C_in * C_out`
  multiply-accumulates *including the taps that fall on the zero padding*, a linear layer
  `in * out` per row. Biases, normalizations, activations, upsampling, the one-hot encoding, SPADE's
  `x * (1 + gamma) + beta` and CLADE's table gather count nothing. This is the convention of the
  usual PyTorch counters (thop / ptflops conv hooks) and it reproduces the MACs measured on the
  official PyTorch models to the digit: SPADE ADE20k 181.150 G, CLADE 42.212 G (official 181.15 G,
  42.21 G). The paper's "FLOPs" column is this number.
* **XLA** — `xla_cost`: `jax.jit(forward).lower(...)` on abstract inputs, then XLA's HLO cost
  analysis. XLA reports `flops`, and it differs from the official convention in three ways:
  (1) one multiply-add is 2 flops; (2) a convolution counts only the taps that land *inside* the
  input (padding taps are free: a 3x3 "same" conv on 8x8 costs 22*22 taps, not 24*24), which makes
  XLA's conv count 1.7% (SPADE) to 3.7% (CLADE) lower on ADE20k, most of it in the 8x8 and 16x16
  layers; (3) every elementwise op, reduction and gather counts too. The lowered (unoptimized) HLO
  is analysed: the compiled module's count was within 1% of it on the tiny configs (the
  optimizer simplifies a few ops), and compiling full-size models takes seconds to minutes
  where lowering takes 0.1 s (`--xla_compiled` analyses the compiled module instead).
* **XLA conv MACs** — the forward's jaxpr is walked and every `conv_general_dilated` is lowered on
  its own and costed by XLA: half of that is XLA's count of the convolutions alone, which must
  equal the analytic count with padding taps excluded (`LayerCount.macs_valid`). The tests check
  that equality exactly, which cross-checks the analytic tracer against XLA; the rest of XLA's
  total (`xla_other_gflops`) is the elementwise work the official convention ignores.

Section 3.3 overheads (`norm_overhead`)
---------------------------------------
The paper's numbers (ADE20k: SPADE +39.21% params / +234.73% FLOPs, CLADE +4.57% / +0.07%) are
reproduced *exactly* by this definition, found by evaluating the candidates: every normalization
layer of the residual blocks is paired with the convolution it feeds (norm_0 -> conv_0,
norm_1 -> conv_1, norm_s -> conv_s: 18 pairs for 7 blocks; `fc` and `conv_img` are not paired), the
paper's formulas (2), (4), (5) are applied with k_c = k_m = 3 for every convolution (also the 1x1
shortcut) and without biases, C being the normalized channels (= the conv's C_in), C_m = 128,
N_c = the one-hot classes; the CLADE gather costs one op per output element; and the ratio is
*total* extra over *total* conv (sum of P_norm / sum of P_conv), not a mean of per-layer ratios
(that mean is 676% for SPADE). We also report the same ratio measured on our actual modules
(real kernel sizes, biases, ICPE / instance-edge convs; CLADE's gather one op per element; the
norm's FLOPs are its own convs' MACs in the official convention).

Runtime (`measure_runtime`) is the median wall time of the jit-compiled inference forward
(`model.eval()`, spectral norm folded as in `clade_jax.synthesize`, `block_until_ready`) after a
warm-up, per image. The paper's runtimes were measured on a GPU; runtimes on another device are
not comparable to them, only to each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.extend import core as jax_core

from clade_jax import configs
from clade_jax.layers.clade import CLADE
from clade_jax.layers.conv import Conv2d, Linear, fold_spectral_norm
from clade_jax.layers.spade import SPADE
from clade_jax.models.build import build_generator, count_params
from clade_jax.models.pix2pixhd import ConvTranspose2d

# The CLADE paper's Table 3 (ECCV 2020): params (M), "FLOPs" (G, really MACs), runtime (s).
# COCO-Stuff and Cityscapes CLADE values are without instance maps; SPADE's with them.
PAPER_TABLE3 = {
    "ade20k": {
        "Pix2pixHD": (182.9, 99.3, 0.041),
        "SPADE": (96.5, 181.3, 0.042),
        "CLADE": (71.4, 42.2, 0.024),
    },
    "coco_stuff": {
        "Pix2pixHD": (183.0, 105.9, 0.045),
        "SPADE": (97.5, 191.0, 0.044),
        "CLADE (no inst.)": (72.4, 42.2, 0.025),
    },
    "cityscapes": {
        "Pix2pixHD": (182.5, 603.7, 0.108),
        "SPADE": (93.0, 1124.0, 0.196),
        "CLADE (no inst.)": (67.8, 300.9, 0.089),
    },
}
# The paper's Table 4 (Cityscapes, with instance maps): params (M), MACs (G).
PAPER_TABLE4 = {"cityscapes": {"SPADE": (93.05, 1126.00), "CLADE": (67.90, 302.17)}}
# MACs (G) measured by running the official PyTorch code at batch 1 (see shared/DESIGN.md).
OFFICIAL_MACS = {
    # pix2pixHD: the official code at 256x256 (the paper's 99.3 G counts each transposed conv
    # per output pixel, thop's convention: 84.80 + 3 x 4.83 = 99.30; see models/pix2pixhd.py).
    "ade20k": {"SPADE": 181.15, "CLADE": 42.21, "Pix2pixHD": 84.80},
    "coco_stuff": {"SPADE": 191.14, "CLADE": 42.39},
    "cityscapes": {"SPADE": 1125.1, "CLADE": 302.04},
}
# Section 3.3, ADE20k 256x256: extra params / FLOPs of the norms relative to their convs (%).
PAPER_OVERHEAD_ADE20K = {"SPADE": (39.21, 234.73), "CLADE": (4.57, 0.07)}
SPADE_HIDDEN = 128  # C_m of the paper's formulas (hard-coded in the official SPADE)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One generator of the table: a display name and the config argument that builds it."""

    name: str
    arg: str  # prepended to the user's config argument, e.g. "norm=spade"
    instance: bool | None = None  # override data.use_instance (None: as the dataset config)


VARIANTS = (
    Variant("SPADE", "norm=spade"),
    Variant("CLADE", "norm=clade"),
    Variant("CLADE-ICPE", "norm=clade,icpe"),
    # The same backbone without normalization layers: the convolution-only floor of the runtime.
    Variant("no norm", "norm=none"),
    Variant("Pix2pixHD", "generator=pix2pixhd"),
    # Seed 003: SPADE with switchable normalization, and its unpooling generator (with SPADE and
    # switchable norms, as the report trains it; and with CLADE). No published numbers.
    Variant("SPADE-SwitchNorm", "norm=spade,pfn=switchable"),
    Variant("Unpool VAE-GAN", "generator=unpool,norm=spade,pfn=switchable"),
    Variant("CLADE-Unpool", "generator=unpool,norm=clade"),
)
# Datasets with instance maps also get this row (the paper's Table 3 CLADE column has none).
NO_INSTANCE_VARIANT = Variant("CLADE (no inst.)", "norm=clade", instance=False)


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


def _call(graphdef, state, inputs):
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
    fn = functools.partial(_call, graphdef)
    lowered = jax.jit(fn).lower(state, inputs)
    analysis = (lowered.compile() if compiled else lowered).cost_analysis()
    closed = jax.make_jaxpr(fn)(state, inputs)
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


# ----------------------------------------------------------------------------- runtime


def random_generator(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
    """The generator of `config` with random weights drawn by NumPy (for timing only).

    Running the real initialisers compiles one small XLA program per distinct parameter shape,
    which takes 15-30 s on a 2-core CPU even for the tiny models; timing does not need the
    official initialisation, only finite weights of the right shapes. BatchNorm running
    statistics are (0, 1) and spectral-norm vectors unit vectors, as after the real init.

    Args:
      config: a generator config.
      seed: NumPy seed.

    Returns:
      The concrete generator (in training mode, as `build_generator` returns it).
    """
    rng = np.random.default_rng(seed)
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: build_generator(config, rngs=nnx.Rngs(0)))
    )

    def fill(path, spec):
        # The last key that names a variable (tree paths end in the Variable's 'value' field).
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = next((n for n in reversed(names) if n not in ("value", "raw_value")), "")
        if name == "running_var":
            return np.ones(spec.shape, spec.dtype)
        if name == "running_mean":
            return np.zeros(spec.shape, spec.dtype)
        x = rng.standard_normal(spec.shape).astype(spec.dtype)
        if name in ("u", "v"):
            return x / np.linalg.norm(x)
        return 0.02 * x

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def measure_runtime(
    config: ml_collections.ConfigDict,
    *,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
) -> float:
    """Median seconds per image of the jit-compiled inference forward on the default device.

    Args:
      config: a generator config (allocates its parameters, random: see `random_generator`).
      batch: images per call.
      repeats: timed calls (the median is returned).
      warmup: untimed calls after compilation.
      seed: parameters and inputs.

    Returns:
      Median wall time of one call divided by `batch`.
    """
    model = random_generator(config, seed)
    model.eval()
    model = fold_spectral_norm(model)  # as inference does (clade_jax.synthesize)
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, spec in generator_inputs(model, batch).items():
        if name == "labels":
            inputs[name] = rng.integers(0, config.data.num_classes, spec.shape, dtype=np.int32)
        elif name == "instance":
            inputs[name] = rng.integers(0, 4, spec.shape, dtype=np.int32)
        else:
            inputs[name] = rng.uniform(-1, 1, spec.shape).astype(np.float32)
    inputs = jax.device_put(inputs)
    graphdef, state = nnx.split(model)
    fn = jax.jit(functools.partial(_call, graphdef))
    for _ in range(max(warmup, 1)):  # the first call compiles
        fn(state, inputs).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(state, inputs).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


# ----------------------------------------------------------------------------- the table


def complexity_row(
    config: ml_collections.ConfigDict,
    *,
    dataset: str = "",
    name: str = "",
    batch: int = 1,
    runtime: bool = False,
    repeats: int = 5,
    xla_compiled: bool = False,
) -> dict:
    """All the numbers of one generator (per image).

    Args:
      config: the generator's config.
      dataset: table label (also selects the published values).
      name: variant name ("SPADE", "CLADE", ...; selects the published values).
      batch: batch size of the traced / timed forward (counts are divided by it).
      runtime: also measure the runtime (allocates and compiles the model).
      repeats: timed calls for the runtime.
      xla_compiled: XLA cost of the compiled module instead of the lowered one.

    Returns:
      A flat dict: dataset, model, params, macs_g (official convention), macs_valid_g,
      xla_gflops, xla_conv_macs_g, xla_other_gflops, overhead (see `norm_overhead`), runtime_s
      (or None), and the published values paper_params_m / paper_macs_g / paper_runtime_s /
      official_macs_g (None where none exists).
    """
    model = abstract_generator(config)
    inputs = generator_inputs(model, batch)
    layers = layer_counts(model, inputs)
    xla = xla_cost(model, inputs, compiled=xla_compiled)
    paper = PAPER_TABLE3.get(dataset, {}).get(name)
    if paper is None and config.data.use_instance:
        t4 = PAPER_TABLE4.get(dataset, {}).get(name)
        paper = (t4[0], t4[1], None) if t4 else None
    official = OFFICIAL_MACS.get(dataset, {}).get(name)  # measured with instance maps if any
    macs = sum(lyr.macs for lyr in layers) / batch
    return {
        "dataset": dataset,
        "model": name,
        "params": count_params(model),
        "macs_g": macs / 1e9,
        "macs_valid_g": sum(lyr.macs_valid for lyr in layers) / batch / 1e9,
        "xla_gflops": xla["flops"] / batch / 1e9,
        "xla_conv_macs_g": xla["conv_flops"] / 2 / batch / 1e9,
        "xla_other_gflops": (xla["flops"] - xla["conv_flops"]) / batch / 1e9,
        "overhead": norm_overhead(model, layers, config.data.num_classes),
        "runtime_s": measure_runtime(config, batch=batch, repeats=repeats) if runtime else None,
        "paper_params_m": paper[0] if paper else None,
        "paper_macs_g": paper[1] if paper else None,
        "paper_runtime_s": paper[2] if paper else None,
        "official_macs_g": official,
    }


def complexity_table(
    config_names: Sequence[str],
    *,
    runtime: bool = False,
    batch: int = 1,
    arg: str = "",
    variants: Sequence[Variant] = VARIANTS,
    repeats: int = 5,
    models: Sequence[str] | None = None,
    xla_compiled: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """The rows of Table 3 for the given dataset configs.

    Args:
      config_names: config specs for `clade_jax.configs.load` ("ade20k", "coco_stuff", ...).
      runtime: measure runtimes (compiles and runs every generator; slow for full sizes on CPU).
      batch: batch size.
      arg: extra config argument applied to every config (e.g. "tiny").
      variants: generator variants; datasets with instance maps also get the CLADE row without.
      repeats: timed calls per runtime.
      models: only the variants with these names (None: all).
      xla_compiled: XLA cost of the compiled module instead of the lowered one.
      log: called with a line per row as it is computed (progress).

    Returns:
      One `complexity_row` dict per (dataset, variant).
    """
    rows = []
    for dataset in config_names:
        extra = (NO_INSTANCE_VARIANT,) if configs.load(dataset, arg).data.use_instance else ()
        for variant in tuple(variants) + extra:
            if models is not None and variant.name not in models:
                continue
            cfg = variant_config(dataset, variant, arg)
            row = complexity_row(
                cfg,
                dataset=dataset,
                name=variant.name,
                batch=batch,
                runtime=runtime,
                repeats=repeats,
                xla_compiled=xla_compiled,
            )
            rows.append(row)
            if log:
                log(f"{dataset} {variant.name}: {row['params']:,} params, {row['macs_g']:.2f} G")
    return rows


def _fmt(value, spec: str) -> str:
    """`value` formatted, or "-" for a missing one (None; NaN: no norm layers to relate)."""
    return "-" if value is None or value != value else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """Table 3 and the section 3.3 overheads as aligned text.

    Args:
      rows: from `complexity_table`.

    Returns:
      A multi-line string.
    """
    head = [
        "dataset",
        "model",
        "params",
        "paper (M)",
        "MACs (G)",
        "official",
        "paper",
        "XLA GFLOPs",
        "XLA conv MACs",
        "no-pad MACs",
        "runtime (s)",
        "paper",
    ]
    body = [
        [
            r["dataset"],
            r["model"],
            f"{r['params']:,}",
            _fmt(r["paper_params_m"], ".2f"),
            f"{r['macs_g']:.3f}",
            _fmt(r["official_macs_g"], ".2f"),
            _fmt(r["paper_macs_g"], ".2f"),
            f"{r['xla_gflops']:.3f}",
            f"{r['xla_conv_macs_g']:.3f}",
            f"{r['macs_valid_g']:.3f}",
            _fmt(r["runtime_s"], ".4f"),
            _fmt(r["paper_runtime_s"], ".3f"),
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))
    out = [
        "Table 3 (per image). MACs: conv/linear multiply-accumulates incl. padding taps (the",
        "official / paper convention; a transposed conv counts each input pixel once).",
        "'official': measured on the official PyTorch code; 'paper': published (Table 3;",
        "Table 4 for instance-map rows without a Table 3 entry). The official pix2pixHD code",
        "measures 84.8 G at 256x256; the paper's 99.3 G counts each transposed conv per output",
        "pixel (thop): 84.80 + 3 x 4.83 = 99.30.",
        "XLA GFLOPs: XLA cost analysis of the whole forward (2 flops per MAC, elementwise ops",
        "included, padding taps excluded); XLA conv MACs: its convolutions alone, which equal",
        "'no-pad MACs', the analytic count without padding taps.",
        "",
        line(head),
        line(["-" * w for w in widths]),
        *map(line, body),
        "",
        "Section 3.3: extra params / FLOPs of the normalization layers relative to the",
        "convolutions they feed, as total extra over total conv (%).",
        "  paper definition: formulas (2), (4), (5) on this backbone (k = 3 for every conv, no",
        "  biases, C_m = 128, CLADE gather = 1 op/element), summed over the norm->conv pairs of",
        "  the residual blocks. measured: this model's own layers (real kernels and biases).",
        "",
    ]
    head2 = [
        "dataset",
        "model",
        "pairs",
        "SPADE params",
        "SPADE FLOPs",
        "CLADE params",
        "CLADE FLOPs",
        "measured params",
        "measured FLOPs",
    ]
    body2 = []
    for r in rows:
        o = r["overhead"]
        body2.append(
            [
                r["dataset"],
                r["model"],
                o["pairs"],
                _fmt(o["paper"]["SPADE"][0], ".2f"),
                _fmt(o["paper"]["SPADE"][1], ".2f"),
                _fmt(o["paper"]["CLADE"][0], ".2f"),
                _fmt(o["paper"]["CLADE"][1], ".3f"),
                _fmt(o["measured"][0], ".2f"),
                _fmt(o["measured"][1], ".3f"),
            ]
        )
    p = PAPER_OVERHEAD_ADE20K
    body2.append(
        [
            "ade20k",
            "paper (Sec. 3.3)",
            "",
            f"{p['SPADE'][0]:.2f}",
            f"{p['SPADE'][1]:.2f}",
            f"{p['CLADE'][0]:.2f}",
            f"{p['CLADE'][1]:.2f}",
            "",
            "",
        ]
    )
    widths2 = [max(len(str(x)) for x in col) for col in zip(head2, *body2, strict=True)]
    line2 = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths2, strict=True))
    out += [line2(head2), line2(["-" * w for w in widths2]), *map(line2, body2)]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        default="ade20k,coco_stuff,cityscapes",
        help="comma-separated config names (clade_jax/configs) or paths",
    )
    parser.add_argument(
        "--config_arg",
        default="",
        help="config argument applied to every config, e.g. 'tiny' or 'bf16'",
    )
    parser.add_argument("--runtime", action="store_true", help="measure runtime per image")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per runtime")
    parser.add_argument(
        "--xla_compiled",
        action="store_true",
        help="XLA cost of the compiled (optimized) module, not the lowered one (slow)",
    )
    parser.add_argument(
        "--models",
        default="",
        help="comma-separated subset of the rows' model names (default: all), "
        "e.g. 'CLADE,CLADE (no inst.)'",
    )
    args = parser.parse_args(argv)
    rows = complexity_table(
        [c for c in args.configs.split(",") if c],
        runtime=args.runtime,
        batch=args.batch,
        arg=args.config_arg,
        repeats=args.repeats,
        models=[m for m in args.models.split(",") if m] or None,
        xla_compiled=args.xla_compiled,
    )
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}")
    print(format_table(rows))


if __name__ == "__main__":
    from clade_jax.backend import configure_cpu_backend

    configure_cpu_backend()
    main()
