"""Shared test helpers: the parity fixtures made by running the official PyTorch code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clade_jax.backend import configure_cpu_backend

configure_cpu_backend()  # the entry points' CPU back-end choice (Eigen), before JAX starts

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


class Fixture:
    """One `../shared/fixtures/*.npz`: torch state, options, and the recorded tensors."""

    def __init__(self, name: str, prefix: str = ""):
        path = FIXTURES / f"{name}.npz"
        if not path.exists():
            raise FileNotFoundError(f"parity fixture {path} is missing (CI needs ../shared)")
        self.data = np.load(path)
        self.prefix = prefix
        self.meta = json.loads(str(self.data[prefix + "meta/json"]))
        self.options = self.meta["options"]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.data[self.prefix + key]

    def keys(self, start: str) -> list[str]:
        n = len(self.prefix)
        return [k[n:] for k in self.data.files if k.startswith(self.prefix + start)]

    @property
    def state(self) -> dict[str, np.ndarray]:
        """Every torch state_dict entry (names without a '/')."""
        n = len(self.prefix)
        return {
            k[n:]: self.data[k]
            for k in self.data.files
            if k.startswith(self.prefix) and "/" not in k[n:]
        }


def nchw(x) -> np.ndarray:
    """NHWC -> NCHW (to compare with the PyTorch tensors)."""
    x = np.asarray(x)
    return np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


@pytest.fixture(scope="session")
def fixture():
    return Fixture


# Tests using `tiny_run` must carry this xdist group (`make test` runs `--dist loadgroup`), so
# that the run is trained once, on the worker that runs them all.
TINY_RUN_GROUP = "tiny_run"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny synthetic config trained for 4 steps on every device (8 host devices in the tests):
    (config, workdir, graphdef, final state). Read-only: copy the workdir to write into it."""
    from clade_jax.configs import synthetic
    from clade_jax.training import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    config = synthetic.get_config("tiny")
    graphdef, state = train_and_evaluate(config, workdir)
    return config, workdir, graphdef, state


def initial_state(config, seed: int = 0):
    """(graphdef, state) of a fresh `GANState` of `config` (dataset size 16), initialised as the
    trainer does: one jit-compiled init from `runtime.init_key(seed)` (built eagerly instead,
    every parameter shape compiles its own sampler: ~13 s for the tiny GAN)."""
    import jax
    from flax import nnx

    from clade_jax.training import runtime
    from clade_jax.training.state import GANState

    make = lambda key: GANState(config, 16, rngs=nnx.Rngs(key))
    graphdef = nnx.split(nnx.eval_shape(lambda: make(runtime.init_key(seed))))[0]
    return graphdef, jax.jit(lambda key: nnx.split(make(key))[1])(runtime.init_key(seed))


def pytest_configure(config):
    """A persistent compilation cache shared by the tests (and their subprocesses): the same
    tiny networks are compiled by several tests."""
    import os

    import jax

    cache = os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax")
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
