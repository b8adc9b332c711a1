"""Parameter counts of the full-size generators equal the official ones exactly.

Counted like torch's `parameters()` (no spectral-norm u/v, no running statistics), with
`nnx.eval_shape`, so nothing is allocated. The ADE20k numbers were measured with the official
code; the COCO-Stuff and Cityscapes ones are cross-checked against an independent closed-form
count of the official architecture (written out below from official-architecture.md), which is
also checked against the measured ADE20k numbers.
"""

from __future__ import annotations

import pytest
from flax import nnx

from clade_jax.configs import ade20k, cityscapes, coco_stuff
from clade_jax.convert import from_official
from clade_jax.models.build import build_generator, count_params

OFFICIAL_ADE20K = {"spade": 96_492_483, "clade": 71_427_267, "clade_icpe": 71_427_375}


def closed_form(
    label_nc: int,
    dontcare: bool,
    instance: bool,
    norm: str,
    icpe: bool = False,
    ngf: int = 64,
    more_up: bool = False,
) -> int:
    """Parameters of the official SPADE / CLADE generator, from its structure alone."""
    k = label_nc + (1 if dontcare else 0)  # class table rows / one-hot channels
    sem = k + (1 if instance else 0)  # generator / SPADE input channels
    a = 1 if (norm == "clade" and instance) else 0

    def conv(cin, cout, ks, bias=True):
        return cin * cout * ks * ks + (cout if bias else 0)

    def norm_params(c):
        if norm == "spade":
            return conv(sem, 128, 3) + 2 * conv(128, c, 3)
        p = 2 * k * c  # ClassAffine scale and shift
        p += 2 * conv(2, 1, 1) if icpe else 0
        p += conv(1, 1, 1) if instance else 0
        return p

    def block(fin, fout):
        fmid = min(fin, fout)
        p = conv(fin + a, fmid, 3) + conv(fmid + a, fout, 3) + norm_params(fin) + norm_params(fmid)
        if fin != fout:
            p += conv(fin + a, fout, 1, bias=False) + norm_params(fin)
        return p

    nf = ngf
    total = conv(sem, 16 * nf, 3)  # fc
    total += 3 * block(16 * nf, 16 * nf)
    total += block(16 * nf, 8 * nf) + block(8 * nf, 4 * nf) + block(4 * nf, 2 * nf)
    total += block(2 * nf, nf)
    total += conv(nf, 3, 3)  # conv_img
    del more_up  # the number of upsamplings does not change the parameter count
    return total


def _count(config) -> int:
    return count_params(nnx.eval_shape(lambda: build_generator(config, rngs=nnx.Rngs(0))))


def test_ade20k_counts_equal_the_official_measurements():
    assert _count(ade20k.get_config("norm=spade")) == OFFICIAL_ADE20K["spade"]
    assert _count(ade20k.get_config()) == OFFICIAL_ADE20K["clade"]
    assert _count(ade20k.get_config("icpe")) == OFFICIAL_ADE20K["clade_icpe"]
    assert closed_form(150, True, False, "spade") == OFFICIAL_ADE20K["spade"]
    assert closed_form(150, True, False, "clade") == OFFICIAL_ADE20K["clade"]
    assert closed_form(150, True, False, "clade", icpe=True) == OFFICIAL_ADE20K["clade_icpe"]


@pytest.mark.parametrize(
    "module, norm, label_nc, dontcare, exact, rounded_m",
    [
        (coco_stuff, "spade", 182, True, 97_480_899, 97.48),
        (coco_stuff, "clade", 182, True, 72_505_383, 72.51),
        (cityscapes, "spade", 35, False, 93_048_003, 93.05),
        (cityscapes, "clade", 35, False, 67_901_991, 67.90),
    ],
)
def test_coco_and_cityscapes_counts(module, norm, label_nc, dontcare, exact, rounded_m):
    config = module.get_config(f"norm={norm}")
    assert config.data.use_instance
    n = _count(config)
    assert (config.data.num_classes, config.data.dontcare_label >= 0) == (
        label_nc + dontcare,
        dontcare,
    )
    assert n == closed_form(label_nc, dontcare, True, norm) == exact
    assert round(n / 1e6, 2) == rounded_m  # DESIGN.md's figures for the official code


def test_counts_without_instance_maps():
    """DESIGN.md: CLADE COCO 72.42 M and Cityscapes 67.82 M without the instance map."""
    for module, label_nc, dontcare, rounded_m in (
        (coco_stuff, 182, True, 72.42),
        (cityscapes, 35, False, 67.82),
    ):
        config = module.get_config()
        config.data.use_instance = False
        n = _count(config)
        assert n == closed_form(label_nc, dontcare, False, "clade")
        assert round(n / 1e6, 2) == rounded_m


def test_from_official_counts_without_allocating():
    options = {
        "label_nc": 150,
        "contain_dontcare_label": True,
        "no_instance": True,
        "crop_size": 256,
        "norm_mode": "clade",
        "add_dist": True,
    }
    g = nnx.eval_shape(lambda: from_official(None, options))
    assert count_params(g) == OFFICIAL_ADE20K["clade_icpe"]
