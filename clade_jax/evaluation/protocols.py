"""The evaluation protocols of the papers, each explicit (`config.eval.protocol`, `--protocol=`).

The SPADE, CLADE and OASIS papers score synthesized images with the same three segmenters but
not in the same way, and SPADE never released its evaluation code. Each protocol below fixes
every choice that changes the numbers, with the source it was read from:

  protocol  segmenter (*)  test          FID reference set           real resized        pixel acc.
  clade     the paper's    single-scale  training split, all images  PIL bilinear        labeled
  spade     the paper's    multi-scale   validation split, all       pipeline (bicubic)  all (**)
  oasis     the paper's    multi-scale   validation split, all       pipeline (bicubic)  labeled
  native    builtin U-Net  single-scale  the evaluated examples      pipeline (bicubic)  labeled

(*) `PAPER_SEGMENTERS`: UperNet101 (ADE20k), DeepLabV2 (COCO-Stuff), DRN-D-105 (Cityscapes).
(**) "labeled": correct / pixels with a class (the don't-care pixels left out, the segmenters'
repositories' rule); "all": correct / every pixel, the don't-care pixels counted as errors. Both
are always reported (`pixel_accuracy_labeled`, `pixel_accuracy_all`); the protocol says which
one is `pixel_accuracy`, and `evaluate(pixel_accuracy=...)` / `--pixel_accuracy` overrides it.
In every protocol the segmenter sees the generated image at the output size (Cityscapes
256x512, the others 256x256) and the labels are nearest-downsampled to it (the evaluation
pipeline's label maps). The README's "Evaluation protocols" section has the same table.

Sources:
* clade: tzt101/CLADE issue #3 (the author: DRN-D-105 with drn-d-105_ms_cityscapes.pth,
  without `--ms`, on the 256x512 outputs with the labels downsampled, not upsampling the
  results); CLADE's `fid_score.py` (statistics of the training images at the output
  resolution, bilinear resize).
* spade: NVlabs/SPADE issue #14 (pytorch-fid "pretty much out of the box", the paper's
  segmenters), #39 (the segmenters: UperNet101 / DeepLabV2 / DRN-D-105, default output sizes
  512x256 and 256x256) and #100 (labels downsampled to the output size; the reported numbers are
  not reproducible exactly). The segmenters run their repositories' own test protocol
  (multi-scale: UperNet's 5 scales, DeepLab's MSC, DRN's `--ms`).
  What the published answers leave open, and what this protocol does about it:
  - Image size: the question in #39 asks whether the default output sizes (512x256 Cityscapes,
    256x256 the others) were evaluated; #100 reports following #39's answer with the label maps
    downsampled to the output size, which is what every protocol does by default. The other
    reading (boschresearch/OASIS#18: SPADE's Cityscapes mIoU reproduced by upsampling the
    generated images to 1024x2048, the size DRN was trained at) is the explicit option
    `evaluate(segmenter_size=(1024, 2048))` / `--segmenter_size=1024x2048`: the images (and
    the real ones) are upsampled with PIL bicubic (OASIS#18 does not say how) and the scores
    are compared with the labels at the output size (the full-size label files are not read).
  - Pixel accuracy: #100 measures 93.5 where the paper reports 81.9 for Cityscapes; the
    explanation given in EndlessSora/TSIT#1 and xh-liu/CC-FPSE#4 is that SPADE's (and CC-FPSE's)
    accuracy counts the pixels without a trainId (255) as errors. So `spade` reports that rule as
    `pixel_accuracy` ("all"); `pixel_accuracy_labeled` is the other reading (about 93 in #100).
    #100's label downsampling is bilinear, which for class ids has no definite meaning; labels
    stay nearest-downsampled.
* oasis: boschresearch/OASIS issue #2 (FID against the 500 validation images resized to
  256x512, bicubic) and #5 (DRN at the generated resolution 512x256, labels nearest-downsampled;
  the question is about `drn --ms`).
* native: this project's earlier behaviour: the examples that were synthesized, with the same
  segmenter on the real images as the reference.

Every protocol ignores the data set's don't-care class (ADE20k 0 = "unknown", COCO-Stuff 255
= unlabelled, Cityscapes ids without a trainId) and maps the labels to the segmenter's classes
(`label_mapping`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The papers' segmenter per data set (`clade_jax.evaluation.segmenters` names).
PAPER_SEGMENTERS = {
    "ade20k": "upernet101",
    "ade20k_outdoor": "upernet101",
    "coco_stuff": "deeplabv2",
    "cityscapes": "drn_d_105",
}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One way of scoring synthesized images (see the module docstring).

    Attributes:
      name: `config.eval.protocol` value.
      multiscale: run the segmenter's multi-scale test protocol.
      paper_segmenter: the data set's default segmenter is the paper's (`PAPER_SEGMENTERS`);
        False: the builtin U-Net of `eval.segmenter_workdir` (or none).
      fid_split: split of the FID reference images; None: the evaluated split.
      fid_all: the whole reference split; False: only the evaluated examples (same count).
      fid_resize: "pipeline" (the evaluation pipeline's images, PIL bicubic) or "bilinear" (PIL
        bilinear from the original files to the output size).
      source: where the choices come from.
      pixel_accuracy: which pixel accuracy is reported as `pixel_accuracy`: "labeled" (correct
        / pixels with a class) or "all" (correct / every pixel, don't-care pixels as errors).
    """

    name: str
    multiscale: bool
    paper_segmenter: bool
    fid_split: str | None
    fid_all: bool
    fid_resize: str
    source: str
    pixel_accuracy: str = "labeled"

    def same_examples(self, split: str) -> bool:
        """Whether the FID reference images are the evaluated examples as the evaluation
        pipeline gives them (then their features are taken in the same pass)."""
        return (
            not self.fid_all and self.fid_split in (None, split) and self.fid_resize == "pipeline"
        )


PROTOCOLS = {
    "clade": Protocol(
        "clade", False, True, "train", True, "bilinear",
        "tzt101/CLADE#3; CLADE fid_score.py",
    ),
    "spade": Protocol(
        "spade", True, True, "validation", True, "pipeline",
        "NVlabs/SPADE#14, #39, #100; EndlessSora/TSIT#1, xh-liu/CC-FPSE#4 (pixel accuracy)",
        "all",
    ),
    "oasis": Protocol(
        "oasis", True, True, "validation", True, "pipeline",
        "boschresearch/OASIS#2, #5",
    ),
    "native": Protocol("native", False, False, None, False, "pipeline", "clade_jax"),
}  # fmt: skip


def get(name: str) -> Protocol:
    """The protocol called `name`; an unknown name is a ValueError listing the known ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown eval.protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def label_mapping(dataset: str, segmenter: str, num_classes: int) -> np.ndarray | None:
    """Data ids -> the paper segmenter's classes (int64 (num_classes,), negative = ignored),
    or None for the identity (ADE20k ids 0..149 and COCO-Stuff 0..181 are the segmenters' own
    classes; their don't-care ids are ignored by the evaluator)."""
    if dataset == "cityscapes" and segmenter == "drn_d_105":
        from clade_jax.evaluation.segmenters.labels import CITYSCAPES_LABELID_TO_TRAINID

        return np.asarray(CITYSCAPES_LABELID_TO_TRAINID, np.int64)[:num_classes]
    return None
