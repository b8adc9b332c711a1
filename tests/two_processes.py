"""What the two-process tests share: launching `train.py` as two `jax.distributed` processes on
127.0.0.1, collecting their logs, reading the state they checkpointed, and the 1-process run that
must end in the same state.

Each process has ONE CPU device (the mesh: 2 devices, process 0's first); collectives across the
processes use gloo. One device per process makes the 2-process run bitwise equal to a 1-process
run on 2 devices: every cross-device reduction (gradients, BatchNorm statistics) then adds exactly
two per-device partial results, and a + b == b + a in floating point, so gloo's order and the
in-process all-reduce's order cannot differ. With more devices per process (measured with 2 x 2 vs
1 x 4) the two all-reduces sum four partials in different orders; the ~1e-7 differences that
leaves in the losses are blown up to a full learning-rate step by Adam's first update
(~lr * sign(g)) on the biases that feed a BatchNorm, whose exact gradient is 0 (their gradient is
pure rounding noise), and then spread to the BatchNorm running means and the other weights.

The 1-process run goes in a third process (`start_one_process_run`): XLA:CPU's convolutions
round differently in a process with another device count (pytest's 8). All three processes run
Eigen single-threaded (`SINGLE_THREADED`). The persistent compilation cache (tests/conftest.py
sets JAX_COMPILATION_CACHE_DIR, which the processes inherit) serves both test files and, through
`_train_main`, process 1 as well as process 0: with a warm cache each test file takes ~45 s.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
DEVICES_PER_PROCESS = 1
# Single-threaded Eigen kernels (convolutions, matmuls) in every process, so that no thread pool
# can decide how a reduction is split (and so how it rounds). Seen with the multi-threaded pool:
# one run in five, with the two cores overloaded (load ~9), went apart from the 1-process run from
# the first update on; the identical rerun matched bitwise. Not reproduced single-threaded.
SINGLE_THREADED = "--xla_cpu_multi_thread_eigen=false"


def xla_flags(device_count: int, *extra: str) -> str:
    """`XLA_FLAGS` for a test's subprocess: the suite's own flags other than the device count (so
    that the subprocesses compile as the tests do; `make test`: LLVM at -O1), then `extra`, then
    `device_count` host devices. Measured alone on a 2-core Xeon, cold cache: test_multihost.py
    114 s (216 CPU-s) with the subprocesses at XLA's default -O3, 100 s (188 CPU-s) at the
    suite's -O1. Both sides of every comparison (the two processes and the 1-process reference,
    or this process) compile with the same optimisation level."""
    inherited = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    return " ".join([*inherited, *extra, f"--xla_force_host_platform_device_count={device_count}"])


# The tiny synthetic config with a smaller discriminator: these tests are about the processes,
# not the networks. `config()` is the same configuration in this process.
CONFIG = "--config=synthetic:tiny"
OVERRIDES = {"model.num_D": 1, "model.n_layers_D": 2}


def config(**overrides):
    """The processes' configuration (CONFIG with OVERRIDES and `overrides`, dotted keys)."""
    from clade_jax.configs import synthetic

    c = synthetic.get_config("tiny")
    for key, value in {**OVERRIDES, **overrides}.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir: Path, **overrides) -> list[subprocess.Popen]:
    """Start `train.py` as processes 0 and 1 of a 2-process run in `workdir` (stdout and stderr
    together, line-buffered); `overrides` are config keys (dotted, e.g. num_train_steps=2).
    `train.py` runs unchanged, through `_train_main` (the compilation cache for process 1)."""
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(DEVICES_PER_PROCESS, SINGLE_THREADED),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides}.items()]
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-u",
                __file__,
                "train",
                CONFIG,
                *flags,
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


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def finish(procs: list[subprocess.Popen], timeout: float, before=None) -> list[str]:
    """Wait for the processes (killing them after `timeout` s); assert that every one exited 0,
    showing the log of each that did not. `before`: output already read from each. Returns the
    logs."""
    outputs = []
    try:
        for p, early in zip(procs, before or [""] * len(procs), strict=True):
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                out += f"\n[killed after {timeout} s]"
            outputs.append(early + out)
    finally:
        kill(procs)
    failed = [
        f"process {i} failed (exit {p.returncode}):\n{out[-3000:]}"
        for i, (p, out) in enumerate(zip(procs, outputs, strict=True))
        if p.returncode != 0
    ]
    assert not failed, "\n\n".join(failed)
    return outputs


def steps(workdir: Path) -> list[int]:
    """The checkpointed steps in `workdir`."""
    return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def leaves(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def restored(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Every leaf of the state checkpointed at `step` (written by the 2 processes), here."""
    from clade_jax.training import checkpoint
    from clade_jax.training.state import GANState

    c = checkpoint.load_config(str(workdir))
    abstract = nnx.split(nnx.eval_shape(lambda: GANState(c, 16, rngs=nnx.Rngs(0))))[1]
    manager = checkpoint.make_manager(str(workdir))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, _, got = checkpoint.restore(manager, abstract, device, step=step)
    manager.close()
    assert got == step
    return leaves(state)


class _AsTwoProcesses:
    """A 1-process iterator yielding the global batch the two processes assemble: process 0's
    share (examples 0, 2, 4, ... of the stream) first, on the mesh's first device, process 1's
    (1, 3, 5, ...) after it. A plain 1-process batch holds the same examples in the order 0, 1,
    2, ...; the per-device BatchNorm partial sums would then differ in rounding."""

    def __init__(self, data_cfg, global_batch_size):
        from clade_jax.data import make_train_iterator

        self.shares = [
            make_train_iterator(
                data_cfg, global_batch_size=global_batch_size, process_index=p, process_count=2
            )
            for p in range(2)
        ]

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.shares]
        return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}

    def get_state(self) -> bytes:  # what grain's checkpoint handler writes for a non-grain one
        return json.dumps([it.get_state() for it in self.shares]).encode()

    def set_state(self, state: bytes) -> None:
        for it, s in zip(self.shares, json.loads(state), strict=True):
            it.set_state(s)


def start_one_process_run(workdir: Path, **overrides) -> subprocess.Popen:
    """Start the same run as a 1-process run on 2 devices (this file as a script), fed the global
    batches the 2 processes assemble, in their order; it checkpoints as they do.

    A process of its own, not this one: XLA:CPU's convolutions round differently in a process
    with another device count (measured: 8 devices, as pytest has, against 1 or 2 gives ~1e-7
    differences in the weight gradients, which Adam blows up as above)."""
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(2 * DEVICES_PER_PROCESS, SINGLE_THREADED),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.Popen(
        [sys.executable, "-u", __file__, str(workdir), json.dumps(overrides)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _one_process_main(workdir: str, overrides: str) -> None:
    from clade_jax import backend

    backend.configure_cpu_backend()  # as train.py (`clade_jax.cli.run`) does, before JAX starts
    from clade_jax.training import loop

    loop.make_train_iterator = lambda data_cfg, *, global_batch_size, **_: _AsTwoProcesses(
        data_cfg, global_batch_size
    )
    mesh = loop.make_mesh(jax.devices()[: 2 * DEVICES_PER_PROCESS])
    loop.train_and_evaluate(config(**json.loads(overrides)), workdir, mesh=mesh)


def differences(expected: dict, got: dict) -> list[str]:
    """The leaves that are not bitwise equal, each with its largest difference relative to its
    largest magnitude (most different first)."""
    assert expected.keys() == got.keys(), sorted(set(expected) ^ set(got))
    rows = []
    for k in expected:
        a, b = np.asarray(expected[k]), np.asarray(got[k])
        if a.shape != b.shape or not np.array_equal(a, b):
            if a.shape != b.shape:
                rows.append((np.inf, f"{k}: shape {a.shape} != {b.shape}"))
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            rel = float(np.abs(a64 - b64).max() / max(np.abs(a64).max(), 1e-30))
            rows.append((rel, f"{k}: max |diff| / max |value| = {rel:.2e}"))
    return [r for _, r in sorted(rows, reverse=True)]


def _train_main(argv: list[str]) -> None:
    """`python train.py ARGV` in this process, with every process writing its compilations to the
    persistent cache. JAX writes only process 0's (`jax._src.compiler._cache_write`), and a
    process's cache key includes its own view of the topology, so process 1 would otherwise
    compile everything again in every test (~70 s of the ~100 s a launch took). Reaches into a
    private JAX function: if that is gone, the processes just compile."""
    import runpy

    try:
        from jax._src import compiler, distributed

        write = compiler._cache_write

        def write_from_any_process(*args, **kwargs):
            real = distributed.global_state.process_id
            distributed.global_state.process_id = 0
            try:
                return write(*args, **kwargs)
            finally:
                distributed.global_state.process_id = real

        compiler._cache_write = write_from_any_process
    except (ImportError, AttributeError):
        pass
    sys.argv = [str(REPO / "train.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1] == "train":
        _train_main(sys.argv[2:])
    else:
        _one_process_main(*sys.argv[1:])
