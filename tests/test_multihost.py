"""Two `jax.distributed` processes on 127.0.0.1 train together, checkpoint together, and end in
exactly (bitwise) the state a 1-process run reaches on the same global batches and devices.

One CPU device per process, gloo collectives (`tests/two_processes.py` says why one device per
process makes the comparison bitwise). The 1-process run is `train_and_evaluate` in a third
process (started alongside) on 2 devices, fed process 0's share of every global batch followed by
process 1's, as `jax.make_array_from_process_local_data` lays them out over the two processes'
devices. Every leaf is compared: G, D, both optimizers' states (Adam's first moment after these
steps is the gradient's, so gradients summed instead of averaged or computed on the wrong examples
show even where Adam's scale-free update hides them), the BatchNorm running statistics, the
spectral-norm vectors and the step counters.
"""

from __future__ import annotations

import os

import pytest
import two_processes as mp

# One worker runs both two-process tests, one after the other (they share compiled programs
# through the persistent cache and would otherwise overload the two cores together).
pytestmark = pytest.mark.xdist_group("multihost")

STEPS = 2
RUN = dict(num_train_steps=STEPS, checkpoint_every_steps=1)


@pytest.mark.slow(reason="two processes + a 1-process reference, each compiling (~134 s cold)")
def test_two_processes_train_checkpoint_and_equal_one_process(tmp_path):
    workdir = tmp_path / "run"
    reference = tmp_path / "one_process"
    procs = mp.launch(workdir, **RUN)
    procs.append(mp.start_one_process_run(reference, **RUN))  # meanwhile
    outputs = mp.finish(procs, timeout=420)[:2]  # a cold compilation cache: ~4 min
    for out in outputs:
        assert "training on 2 devices in 2 processes" in out
    assert mp.steps(workdir) == [1, 2]
    for step in ("1", "2"):
        data = sorted(os.listdir(workdir / "checkpoints" / step / "data"))
        assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)
        assert (workdir / "checkpoints" / step / "state").is_dir()
    assert (workdir / "config.json").exists()
    assert (workdir / "samples" / f"step_{STEPS:07d}.png").exists()  # process 0's sample grid

    two, one = mp.restored(workdir, STEPS), mp.restored(reference, STEPS)
    assert int(two["opt_g/step"]) == int(two["opt_d/step"]) == STEPS
    different = mp.differences(one, two)
    assert not different, f"{len(different)} of {len(one)} leaves differ:\n" + "\n".join(
        different[:12]
    )
