"""No TensorFlow: the entry points never import it, and TensorBoard files come from tensorboardX.

* In a fresh interpreter, a `sys.meta_path` finder records every attempt to import `tensorflow`
  (an attempt fails the test even on a machine where TensorFlow is not installed, where it would
  have passed silently), then imports what `train.py`, `evaluate.py`, `synthesize`, `convert`,
  the painting app and the demo import; `tensorflow` must not be in `sys.modules` either.
* The event files `runtime.create_writer` writes are read back record by record (the TFRecord
  framing and the `Event` protobuf TensorBoard reads): scalars, images and hyperparameters under
  the tags given; and the tiny training run's events carry the loop's tags.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN_GROUP

REPO = Path(__file__).resolve().parents[1]

# What each entry point imports at start-up and on its main path.
ENTRY_MODULES = [
    "train",  # train.py
    "evaluate",  # evaluate.py
    "clade_jax.training.loop",
    "clade_jax.evaluation.evaluate",
    "clade_jax.evaluation.segmenter",
    "clade_jax.synthesize",
    "clade_jax.convert.workdir",
    "clade_jax.demo",
    "clade_jax.data.tfds_builder",
    "clade_jax.paint.server",
]

_PROBE = r"""
import importlib, importlib.util, json, sys

attempts = []

class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            attempts.append(name)
        return None

sys.meta_path.insert(0, Recorder())
from absl import flags  # entry scripts define flags of the same names: drop them after each

done = []
for name in sys.argv[1:]:
    if importlib.util.find_spec(name) is None:
        continue
    before = set(flags.FLAGS)
    importlib.import_module(name)
    for flag in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, flag)
    done.append(name)
print(json.dumps({"attempts": attempts, "loaded": "tensorflow" in sys.modules, "done": done}))
"""


def _probe(modules: list[str], path: Path | None = None) -> dict:
    pythonpath = os.pathsep.join(str(p) for p in (REPO, path) if p is not None)
    env = {**os.environ, "PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_entry_points_do_not_import_tensorflow():
    result = _probe(ENTRY_MODULES)
    assert {"train", "evaluate", "clade_jax.training.loop", "clade_jax.synthesize"} <= set(
        result["done"]
    )
    assert result["attempts"] == [], result
    assert not result["loaded"]


def test_the_probe_sees_a_tensorflow_import(tmp_path):
    """The probe itself: a module that tries `import tensorflow` (as clu's writers do) is
    caught even where TensorFlow is not installed."""
    (tmp_path / "tries_tf.py").write_text(
        "try:\n    import tensorflow.summary\nexcept ImportError:\n    pass\n"
    )
    result = _probe(["tries_tf"], tmp_path)
    assert result["done"] == ["tries_tf"] and result["attempts"] == ["tensorflow"], result


# ----------------------------------------------------------------------------- event files


def _events(logdir: Path) -> list:
    """Every `Event` of the event files in `logdir` (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    files = sorted(f for f in os.listdir(logdir) if f.startswith("events.out.tfevents"))
    assert files, f"no event file in {logdir}"
    for name in files:
        data = (logdir / name).read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            record = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = Event()
            event.ParseFromString(record)
            events.append(event)
    return events


def _values(events) -> dict[str, list]:
    """tag -> [(step, Summary.Value)]."""
    out: dict[str, list] = {}
    for e in events:
        for v in e.summary.value:
            out.setdefault(v.tag, []).append((e.step, v))
    return out


def test_writer_writes_scalars_images_and_hparams(tmp_path):
    import io

    from PIL import Image

    from clade_jax.training.runtime import MetricWriter, create_writer

    writer = create_writer(tmp_path, enabled=True)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    writer.write_hparams({"model.norm": "clade", "batch_size": 8, "lr": 2e-4, "widths": (1, 2)})
    writer.write_scalars(3, {"G_GAN": 0.5, "train/loss": np.float32(1.25)})
    writer.write_scalars(5, {"G_GAN": 0.25})
    writer.write_images(5, {"samples": image[None]})
    writer.close()
    values = _values(_events(tmp_path))
    assert [(s, v.simple_value) for s, v in values["G_GAN"]] == [(3, 0.5), (5, 0.25)]
    assert [(s, v.simple_value) for s, v in values["train/loss"]] == [(3, 1.25)]
    ((step, img),) = values["samples"]
    assert step == 5 and (img.image.height, img.image.width) == (6, 10)
    decoded = np.asarray(Image.open(io.BytesIO(img.image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, image)  # PNG: lossless, same pixels
    ((_, hp),) = values["_hparams_/session_start_info"]
    assert hp.metadata.plugin_data.plugin_name == "hparams"
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    content = HParamsPluginData()
    content.ParseFromString(hp.metadata.plugin_data.content)
    hparams = content.session_start_info.hparams
    assert hparams["model.norm"].string_value == "clade"
    assert hparams["batch_size"].number_value == 8 and hparams["lr"].number_value == 2e-4
    assert hparams["widths"].string_value == "(1, 2)"
    # Other processes write nothing.
    silent = MetricWriter(tmp_path / "other", enabled=False)
    silent.write_scalars(1, {"x": 1.0})
    silent.close()
    assert not (tmp_path / "other").exists()


@pytest.mark.xdist_group(TINY_RUN_GROUP)
def test_training_events_carry_the_loops_tags(tiny_run):
    config, workdir, _, _ = tiny_run
    values = _values(_events(Path(workdir)))
    for tag in ("G_GAN", "G_GAN_Feat", "D_Fake", "D_real", "lr_g", "lr_d", "steps_per_sec"):
        assert [s for s, _ in values[tag]] == [2, 4], tag
    assert [s for s, _ in values["samples"]] == [2, 4]
    assert "_hparams_/session_start_info" in values
    assert (Path(workdir) / "parameters.txt").read_text().startswith("gen: ")
