"""The config resolver: every spelling of a package config gives the same config, `:arg` applies,
user files load from their path, unknown names fail naming the known ones, and the absl flag
(`configs.DEFINE_config`) takes the same specs plus ml_collections' `--config.field=value`."""

import os

import pytest
from absl import flags

from clade_jax import configs
from clade_jax.configs import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "spec",
    [
        "ade20k",
        "ade20k.py",
        "configs/ade20k.py",
        "./configs/ade20k.py",
        "clade_jax/configs/ade20k.py",
        os.path.join(REPO, "clade_jax", "configs", "ade20k.py"),
    ],
)
def test_every_spelling_names_the_package_config(spec):
    assert configs.load(spec + ":norm=spade,tiny").to_dict() == (
        configs.load("ade20k", "norm=spade,tiny").to_dict()
    )
    assert configs.config_module(configs.split_spec(spec)[0]).__name__ == "clade_jax.configs.ade20k"


def test_arg_reaches_get_config():
    c = configs.load("synthetic:tiny,norm=spade,steps=3")
    assert (c.model.norm, c.num_train_steps, c.model.ngf) == ("spade", 3, 4)
    assert configs.load("synthetic").model.norm == "clade"
    with pytest.raises(ValueError, match="both after the colon"):
        configs.load("synthetic:tiny", "norm=spade")


def test_names_lists_the_dataset_configs():
    assert {"ade20k", "coco_stuff", "cityscapes", "synthetic", "segmenter"} <= set(configs.names())
    assert "common" not in configs.names()


def test_user_file_outside_the_package(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from clade_jax.configs import synthetic\n"
        "def get_config(arg=None):\n"
        "    c = synthetic.get_config(arg)\n"
        "    c.seed = 17\n"
        "    return c\n"
    )
    c = configs.load(f"{path}:tiny")
    assert (c.seed, c.model.ngf) == (17, 4)


def test_unknown_config_names_the_known_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="ade20k_typo.*known: ade20k"):
        configs.load("ade20k_typo")
    (tmp_path / "nothing.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no get_config"):
        configs.load(str(tmp_path / "nothing.py"))


def test_flag_takes_a_name_and_overrides():
    fv = flags.FlagValues()
    argv = ["prog", "--config=synthetic:tiny", "--config.batch_size=4"]
    holder = configs.DEFINE_config("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    assert holder.value.batch_size == 4
    assert holder.value.model.ngf == synthetic.get_config("tiny").model.ngf
    assert holder.value.is_locked


@pytest.mark.parametrize("name", ["ade20k", "ade20k_outdoor", "coco_stuff", "cityscapes"])
def test_prepare_checks_labels_with_the_configs_classes(name):
    """`python -m clade_jax.data.prepare` takes the label constants from the dataset's config."""
    from clade_jax.data.decoding import label_encoding
    from clade_jax.data.prepare import encoding_for

    assert encoding_for(name) == label_encoding(configs.load(name).data)
    assert encoding_for(name, label_255_to=-1).label_255_to == -1
    assert encoding_for("custom") is None
    assert encoding_for("custom", num_classes=13).num_classes == 13


def test_typed_arg_parser():
    from clade_jax.configs.common import parse_arg

    a = parse_arg(
        "norm=spade,icpe,steps=3,lr=0.5,vae=false", norm="", icpe=False, steps=0, lr=0.0, vae=True
    )
    assert (a.norm, a.icpe, a.steps, a.lr, a.vae) == ("spade", True, 3, 0.5, False)
    assert parse_arg(None, steps=7).steps == 7
    with pytest.raises(ValueError, match="unknown config argument 'nrom'.*known: \\['norm'\\]"):
        parse_arg("nrom=spade", norm="")
    with pytest.raises(ValueError, match="'steps=x': steps takes a int"):
        parse_arg("steps=x", steps=0)
    with pytest.raises(ValueError, match="'steps': steps takes a int"):
        parse_arg("steps", steps=0)
    with pytest.raises(ValueError, match="unknown config argument"):
        configs.load("synthetic:tiny,nrom=spade")
    seg = configs.load("segmenter:dataset=ade20k,tiny,width=8,lr=0.01")
    assert seg.data.num_classes == 151 and seg.model.widths[0] == 8 and seg.optim.lr == 0.01
    assert seg.data.crop_size == 32  # tiny reached the segmenter's own shrinking


@pytest.mark.parametrize("old, new", [("spade", "spade_clade"), ("unpool_vaegan", "unpool")])
def test_old_generator_names_of_stored_configs_still_build(old, new):
    """config.json of an older workdir names the generator by its old name: same network."""
    from clade_jax.models.build import generator_kwargs

    c = configs.load("synthetic:tiny")
    c.model.generator = new
    want = generator_kwargs(c)
    c.model.generator = old
    with pytest.warns(DeprecationWarning, match=f"'{old}' is now '{new}'"):
        assert generator_kwargs(c) == want
