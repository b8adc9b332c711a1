"""Model complexity: the CLADE paper's Table 3 (params, MACs, runtime) and section 3.3 overheads.

Modules: `reference` (the published tables, the rows' variants), `counts` (analytic and XLA
counts, the section 3.3 overheads), `timing` (the runtime column; `benchmarks/generators.py`
times with it too), `table` (rows and their text), `cli` (the command).

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

from clade_jax.evaluation.complexity.cli import main
from clade_jax.evaluation.complexity.counts import (
    LayerCount,
    abstract_generator,
    forward,
    generator_inputs,
    layer_counts,
    norm_conv_pairs,
    norm_overhead,
    variant_config,
    xla_cost,
)
from clade_jax.evaluation.complexity.reference import (
    NO_INSTANCE_VARIANT,
    OFFICIAL_MACS,
    PAPER_TABLE3,
    PAPER_TABLE4,
    VARIANTS,
    Variant,
)
from clade_jax.evaluation.complexity.table import complexity_row, complexity_table, format_table
from clade_jax.evaluation.complexity.timing import (
    compiled_forward,
    measure_runtime,
    random_generator,
    random_module,
    time_rounds,
    warm_up,
)
from clade_jax.models.build import count_params

__all__ = [
    "LayerCount",
    "NO_INSTANCE_VARIANT",
    "OFFICIAL_MACS",
    "PAPER_TABLE3",
    "PAPER_TABLE4",
    "VARIANTS",
    "Variant",
    "abstract_generator",
    "compiled_forward",
    "complexity_row",
    "complexity_table",
    "count_params",
    "format_table",
    "forward",
    "generator_inputs",
    "layer_counts",
    "main",
    "measure_runtime",
    "norm_conv_pairs",
    "norm_overhead",
    "random_generator",
    "random_module",
    "time_rounds",
    "variant_config",
    "warm_up",
    "xla_cost",
]
