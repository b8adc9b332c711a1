"""Preemption agreed across processes: SIGTERM to one of two `jax.distributed` processes.

Two processes on 127.0.0.1 (two CPU devices each, gloo collectives; the set-up of
`test_multihost.py`, so the two share compilations through the cache) train the tiny config; SIGTERM
goes to process 1 only. JAX's preemption service shares the notice, both processes save the same
step and exit 0 (a process that stopped alone would leave the other hanging in the next
collective: the bounded wait catches that). A restart resumes from that step and ends bitwise
equal to an uninterrupted two-process run of the same length.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from clade_jax.training import checkpoint
from clade_jax.training.state import GANState

# Same worker as test_multihost.py (when it carries this group too): compiled once, cached.
pytestmark = pytest.mark.xdist_group("multihost")

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "--config=synthetic:tiny",
    # a smaller discriminator: this test is about the processes, not the networks
    "--config.model.num_D=1",
    "--config.model.n_layers_D=2",
    "--config.log_every_steps=1",
    "--config.image_every_steps=0",
    "--config.checkpoint_every_steps=100000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, steps: int) -> list[subprocess.Popen]:
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-u",
                str(REPO / "train.py"),
                *ARGS,
                f"--config.num_train_steps={steps}",
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


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    return outputs


def _steps(workdir: Path) -> list[int]:
    return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def _state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    config = checkpoint.load_config(str(workdir))
    abstract = nnx.eval_shape(lambda: GANState(config, 16, rngs=nnx.Rngs(0)))
    _, abstract_state = nnx.split(abstract)
    manager = checkpoint.make_manager(str(workdir), keep=3)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, _, _ = checkpoint.restore(manager, abstract_state, device, step=step)
    manager.close()
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    workdir = tmp_path / "preempted"
    procs = _launch(workdir, steps=100000)
    lines = []
    deadline = time.time() + 240
    try:
        for line in procs[0].stdout:  # process 0 prints the step lines
            lines.append(line)
            if re.search(r"training 2/100000", line):
                procs[1].send_signal(signal.SIGTERM)  # one host is preempted
                break
            assert time.time() < deadline, "no training step in time:\n" + "".join(lines)
        sent = time.time()
        outputs = _finish(procs, timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert time.time() - sent < 120
    outputs[0] = "".join(lines) + outputs[0]
    (step,) = _steps(workdir)  # one checkpoint: the preemption's, written by both processes
    assert 2 <= step < 100000
    data = sorted(os.listdir(workdir / "checkpoints" / str(step) / "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)
    for i, out in enumerate(outputs):
        agreed = re.findall(r"preemption notice: every process saves step (\d+)", out)
        assert agreed == [str(step)], f"process {i}:\n{out[-3000:]}"

    # Restart: resumes at that step and runs 2 more; bitwise equal to 2 + step straight steps.
    # The two runs go side by side (both read the compilation cache the first run filled).
    end = step + 2
    straight = tmp_path / "straight"
    resumed, uninterrupted = _launch(workdir, steps=end), _launch(straight, steps=end)
    out = _finish(resumed, timeout=240)
    _finish(uninterrupted, timeout=240)
    assert f"resumed {workdir} at step {step}" in out[0]
    assert _steps(workdir)[-1] == end and _steps(straight)[-1] == end
    a, b = _state(workdir, end), _state(straight, end)
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different[:5]
