"""Select ADE20k-outdoor from ADE20k: the images that show outdoor scenes.

    python -m clade_jax.data.ade20k_outdoor --root=/data/ADEChallengeData2016 \
        --out=/data/ADE20k_outdoor [--classes=sky,tree,sea] [--min_fraction=0] [--mode=symlink]

The output folder has the ADEChallengeData2016 layout (`images/{training,validation}/*.jpg`,
`annotations/{training,validation}/*.png`), so it is read with `data.dataset = 'ade20k_outdoor'`
(same classes and remapping as ADE20k), plus `selection.txt` recording the rule and the names.

The rule. SPADE and CLADE evaluate on "ADE20k-outdoor", the subset of ADE20k with outdoor scenes
used by SIMS (Qi et al. 2018). The CLADE paper (section 4.1) says how its copy was made: "we
directly select the images containing categories such as sky, trees, and sea without manual
inspection. There are 9,649 training images and 943 validation images." We implement exactly that
rule, with the three classes it names as the default:

    an image is outdoor  <=>  its annotation contains at least one pixel of sky, tree or sea
                              (raw PNG values 3, 5, 27), i.e. more than `min_fraction` of its
                              pixels belong to these classes (default 0: any pixel).

Caveat: "such as" leaves the exact class list open, and without the data here we could not check
that this rule reproduces the 9,649 / 943 counts; the tool prints its counts so that they can be
compared (CLADE also distributes its subset; using that copy is the way to compare numbers with the
paper).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence

import numpy as np

from clade_jax.data.classes import ADE20K_CLASSES
from clade_jax.data.decoding import read_id_map
from clade_jax.data.layouts import SPLITS, ExampleFiles, FolderLayout, list_examples

OUTDOOR_CLASSES = ("sky", "tree", "sea")
_FOLDERS = {"train": "training", "validation": "validation"}


def raw_ids(class_names: Iterable[str]) -> tuple[int, ...]:
    """Raw ADE20k PNG values (class index + 1) of the named classes; raises on unknown names."""
    ids = []
    for name in class_names:
        if name not in ADE20K_CLASSES:
            raise ValueError(f"{name!r} is not an ADE20k class (see clade_jax.data.classes)")
        ids.append(ADE20K_CLASSES.index(name) + 1)
    return tuple(ids)


def is_outdoor(raw_label: np.ndarray, ids: Sequence[int], min_fraction: float = 0.0) -> bool:
    """Whether more than `min_fraction` of the raw label map's pixels have one of `ids`.

    Args:
      raw_label: (H, W) raw ADE20k annotation (0 = unknown, k = class k - 1).
      ids: raw values of the outdoor classes (`raw_ids(OUTDOOR_CLASSES)`).
      min_fraction: threshold on the fraction of outdoor-class pixels (0: any pixel counts).

    Returns:
      True if the image is selected.
    """
    fraction = np.isin(raw_label, np.asarray(ids)).mean()
    return bool(fraction > min_fraction)


def select_outdoor(
    root: str,
    *,
    classes: Sequence[str] = OUTDOOR_CLASSES,
    min_fraction: float = 0.0,
    splits: Sequence[str] = SPLITS,
) -> dict[str, list[ExampleFiles]]:
    """Applies the rule to every annotation of ADE20k under `root`.

    Args:
      root: the ADEChallengeData2016 folder.
      classes: ADE20k class names whose presence makes an image outdoor.
      min_fraction: see `is_outdoor`.
      splits: which splits to scan.

    Returns:
      {split: the selected examples}.
    """
    ids = raw_ids(classes)
    layout = FolderLayout(dataset="ade20k", root=root)
    return {
        split: [
            e
            for e in list_examples(layout, split)
            if is_outdoor(read_id_map(e.label, e.label), ids, min_fraction)
        ]
        for split in splits
    }


def write_subset(
    selection: dict[str, list[ExampleFiles]],
    out: str,
    *,
    mode: str = "copy",
    rule: str = "",
) -> None:
    """Writes the selected files in the ADEChallengeData2016 layout under `out`.

    Args:
      selection: from `select_outdoor`.
      out: output folder (created; existing files are replaced).
      mode: 'copy', 'symlink' or 'hardlink'.
      rule: text recorded at the top of `out/selection.txt`.
    """
    if mode not in ("copy", "symlink", "hardlink"):
        raise ValueError(f"mode must be copy, symlink or hardlink, got {mode!r}")
    lines = [f"# {rule}"] if rule else []
    for split, examples in selection.items():
        folder = _FOLDERS[split]
        for kind in ("images", "annotations"):
            os.makedirs(os.path.join(out, kind, folder), exist_ok=True)
        for e in examples:
            for kind, src in (("images", e.image), ("annotations", e.label)):
                dst = os.path.join(out, kind, folder, os.path.basename(src))
                if os.path.lexists(dst):
                    os.remove(dst)
                if mode == "copy":
                    shutil.copyfile(src, dst)
                elif mode == "symlink":
                    os.symlink(os.path.abspath(src), dst)
                else:
                    os.link(src, dst)
            lines.append(f"{split} {e.name}")
    with open(os.path.join(out, "selection.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str]) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    if not os.path.isdir(f.root):
        raise NotADirectoryError(f"root={f.root} is not a directory (the ADEChallengeData2016 one)")
    classes = tuple(f.classes)
    rule = (
        f"ADE20k-outdoor: annotation has > {f.min_fraction} of its pixels in {', '.join(classes)}"
        f" (raw ids {raw_ids(classes)})"
    )
    selection = select_outdoor(f.root, classes=classes, min_fraction=f.min_fraction)
    write_subset(selection, f.out, mode=f.mode, rule=rule)
    counts = ", ".join(f"{split}: {len(v)}" for split, v in selection.items())
    print(f"{rule}\nselected {counts} -> {f.out}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("root", None, "ADEChallengeData2016 folder.")
    flags.DEFINE_string("out", None, "Output folder (ADE20k layout).")
    flags.DEFINE_list("classes", list(OUTDOOR_CLASSES), "ADE20k classes marking outdoor scenes.")
    flags.DEFINE_float("min_fraction", 0.0, "Minimum fraction of outdoor-class pixels (0: any).")
    flags.DEFINE_enum("mode", "copy", ["copy", "symlink", "hardlink"], "How to place the files.")
    flags.mark_flags_as_required(["root", "out"])


if __name__ == "__main__":
    from clade_jax import cli

    _define_flags()
    cli.run(main)  # console lines, user errors -> one paragraph and exit 2, --traceback
