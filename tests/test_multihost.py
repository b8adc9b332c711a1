"""Two `jax.distributed` processes on 127.0.0.1 train a few steps and checkpoint together, and
end in the state a single process reaches on the same global batches over the same 4 devices.

Each process has 2 CPU devices (4 in the mesh); collectives across the processes use gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config():
    """What the processes run: the tiny config with a smaller discriminator."""
    from clade_jax.configs import synthetic

    config = synthetic.get_config("tiny")
    config.model.num_D = 1
    config.model.n_layers_D = 2
    return config


class _AsTwoProcesses:
    """A 1-process iterator yielding the global batch the two processes assemble: process 0's
    share (examples 0, 2, 4, ... of the stream) on the first two devices, process 1's after."""

    def __init__(self, data_cfg, global_batch_size):
        from clade_jax.data import make_train_iterator

        self.shares = [
            make_train_iterator(
                data_cfg, global_batch_size=global_batch_size, process_index=p, process_count=2
            )
            for p in range(2)
        ]

    def __next__(self):
        parts = [next(it) for it in self.shares]
        return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}


def _single_process_reference(workdir: str, monkeypatch) -> dict:
    """The same 4 steps in this process, on 4 of its devices, on the same global batches."""
    from test_training import _leaves

    from clade_jax.training import checkpoint, loop

    monkeypatch.setattr(
        loop,
        "make_train_iterator",
        lambda data_cfg, *, global_batch_size, **_: _AsTwoProcesses(data_cfg, global_batch_size),
    )
    save = checkpoint.save
    monkeypatch.setattr(  # no data position to save for this stand-in iterator
        checkpoint,
        "save",
        lambda manager, step, state, it=None, **kw: save(manager, step, state, **kw),
    )
    _, state = loop.train_and_evaluate(_config(), workdir, mesh=loop.make_mesh(jax.devices()[:4]))
    return _leaves(state)


def _restored(workdir: str) -> dict:
    from test_training import _leaves

    from clade_jax.training import checkpoint
    from clade_jax.training.state import GANState

    config = checkpoint.load_config(workdir)
    abstract = nnx.split(nnx.eval_shape(lambda: GANState(config, 16, rngs=nnx.Rngs(0))))[1]
    manager = checkpoint.make_manager(workdir)
    local = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved by 2 processes
    state, _, step = checkpoint.restore(manager, abstract, local, step=4)
    manager.close()
    assert step == 4
    return _leaves(state)


def test_two_processes_train_and_checkpoint(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "train.py"),
                "--config=configs/synthetic.py:tiny",
                # a smaller discriminator: this test is about the processes, not the networks
                "--config.model.num_D=1",
                "--config.model.n_layers_D=2",
                f"--workdir={workdir}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=420)
            outputs.append(out)
    finally:
        for p in procs:
            p.kill()
    failed = [
        f"process {i} failed (exit {p.returncode}):\n{out[-3000:]}"
        for i, (p, out) in enumerate(zip(procs, outputs, strict=True))
        if p.returncode != 0
    ]
    assert not failed, "\n\n".join(failed)
    for out in outputs:
        assert "training on 4 devices in 2 processes" in out
    for step in ("2", "4"):
        data = sorted(os.listdir(workdir / "checkpoints" / step / "data"))
        assert "process_0-of-2.json" in data and "process_1-of-2.json" in data
        assert (workdir / "checkpoints" / step / "state").is_dir()
    assert (workdir / "config.json").exists()
    # The final state equals the single-process run on the same batches and devices.
    two = _restored(str(workdir))
    one = _single_process_reference(str(tmp_path / "reference"), monkeypatch)
    assert one.keys() == two.keys()
    different = sorted(k for k in one if not np.array_equal(one[k], two[k]))
    worst = {
        k: float(np.abs(one[k] - two[k]).max() / max(np.abs(one[k]).max(), 1e-30))
        for k in different
    }
    assert not different, sorted(worst.items(), key=lambda kv: -kv[1])[:10]
