"""The wheel works on its own: built from the source, installed into a fresh virtual environment
outside the repository, and run from a folder that is not the repository.

The environment gets the wheel with `--no-deps` and sees the already installed dependencies
through a `.pth` line naming this interpreter's site-packages (whose own `.pth` files, the
editable install of clade_jax among them, are then not processed), so the test needs no network
for the dependencies and stays fast. Building the wheel uses pip's build isolation (setuptools
from the package index, as `pip install .` does). From there it runs, at the same time:

* `python -m clade_jax.evaluation.complexity --configs=ade20k` (the table, from the shipped
  configs);
* the library entry of `train.py` on a config named by name (`configs.load("synthetic:tiny")`),
  2 steps;
* `python -m clade_jax.convert` on an official-format checkpoint folder (as test_convert.py
  writes them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from conftest import Fixture
from test_convert import write_official_dir

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds per command (a loaded 2-core machine); ~30 s when idle


def _run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding only the wheel, its environment, an empty work folder)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "clade_jax", src / "clade_jax", ignore=ignore)
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("clade_jax-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]  # this interpreter's packages (jax, flax, ...)
    (Path(purelib) / "_clade_jax_test_deps.pth").write_text(deps + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
        + ["--no-index", str(wheel)]
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    work = root / "work"
    work.mkdir()
    return python, env, work, Path(purelib)


def test_installed_wheel_runs_complexity_training_and_conversion(installed):
    python, env, work, purelib = installed
    official = work / "official"
    official.mkdir()
    write_official_dir(official, Fixture("clade_tiny"))
    train = work / "train.py"
    train.write_text(
        textwrap.dedent(
            f"""
            import importlib.util, sys
            import clade_jax
            assert clade_jax.__file__.startswith({str(purelib)!r}), clade_jax.__file__
            assert {str(REPO)!r} not in sys.path and importlib.util.find_spec("conftest") is None
            from clade_jax.backend import configure_cpu_backend
            configure_cpu_backend()
            from clade_jax import configs
            from clade_jax.training import train_and_evaluate
            train_and_evaluate(configs.load("synthetic:tiny,steps=2"), sys.argv[1])
            """
        )
    )
    commands = {
        "complexity": [str(python), "-m", "clade_jax.evaluation.complexity", "--configs=ade20k"],
        "train": [str(python), str(train), str(work / "run")],
        "convert": [str(python), "-m", "clade_jax.convert", f"--official_dir={official}"]
        + [f"--workdir={work / 'converted'}"],
    }
    procs = {
        name: subprocess.Popen(
            cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    outs = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert proc.returncode == 0, f"{name} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        outs[name] = stdout

    rows = {line.split()[1]: line.split() for line in outs["complexity"].splitlines()[2:] if line}
    assert rows["CLADE"][0] == "ade20k" and float(rows["CLADE"][-2]) < float(rows["SPADE"][-2])
    assert (work / "run" / "checkpoints" / "2").is_dir()
    assert json.loads((work / "run" / "config.json").read_text())["num_train_steps"] == 2
    converted = json.loads((work / "converted" / "config.json").read_text())
    assert converted["model"]["norm"] == "clade" and converted["data"]["num_classes"] == 9
    assert (work / "converted" / "checkpoints" / "0").is_dir()
