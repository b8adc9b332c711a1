"""Two `jax.distributed` processes on 127.0.0.1 train a few steps and checkpoint together.

(Open, issue #14: the final state should also equal a single process's on the same global
batches over the same 4 devices; a first version of that comparison found large differences
that were not diagnosed in time, see the session note.)

Each process has 2 CPU devices (4 in the mesh); collectives across the processes use gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# One worker runs both two-process tests, one after the other (they share compiled programs
# through the persistent cache and would otherwise overload the two cores together).
pytestmark = pytest.mark.xdist_group("multihost")

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_checkpoint(tmp_path):
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
