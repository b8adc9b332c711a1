"""The published numbers the table is compared with, and the table's generator variants:
the CLADE paper's Tables 3 and 4, the MACs measured on the official PyTorch code, the rows."""

from __future__ import annotations

import dataclasses

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
