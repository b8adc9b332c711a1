"""The rows of the table (`complexity_table`) and their text form (`format_table`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_collections

from clade_jax import configs
from clade_jax.evaluation.complexity.counts import (
    abstract_generator,
    generator_inputs,
    layer_counts,
    norm_overhead,
    variant_config,
    xla_cost,
)
from clade_jax.evaluation.complexity.reference import (
    NO_INSTANCE_VARIANT,
    OFFICIAL_MACS,
    PAPER_OVERHEAD_ADE20K,
    PAPER_TABLE3,
    PAPER_TABLE4,
    VARIANTS,
    Variant,
)
from clade_jax.evaluation.complexity.timing import measure_runtime
from clade_jax.models.build import count_params


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
