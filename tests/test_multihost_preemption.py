"""Preemption agreed across processes: SIGTERM to one of two `jax.distributed` processes.

Two processes on 127.0.0.1 (one CPU device each, gloo collectives; the set-up of
`tests/two_processes.py`, shared with `test_multihost.py`, so the two share compilations through
the cache) train the tiny config; SIGTERM goes to process 1 only. JAX's preemption service shares
the notice, both processes save the same step and exit 0 (a process that stopped alone would
leave the other hanging in the next collective: the bounded wait catches that). A restart resumes
from that step (state and data position) and ends bitwise equal to an uninterrupted run of the
same length: the 1-process run that `test_multihost.py` shows to equal the 2-process one bitwise,
in a third process while the restarted processes run.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import two_processes as mp

# Same worker as test_multihost.py: compiled once, cached.
pytestmark = pytest.mark.xdist_group("multihost")

RUN = dict(log_every_steps=1, image_every_steps=0, checkpoint_every_steps=100000)
BOUND = 120  # seconds from SIGTERM to both processes' exit


@pytest.mark.slow(reason="two jax.distributed processes trained, stopped by SIGTERM and restarted")
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    workdir = tmp_path / "preempted"
    procs = mp.launch(workdir, num_train_steps=100000, **RUN)
    lines = []
    deadline = time.time() + 420  # a cold compilation cache: ~4 min
    try:
        for line in procs[0].stdout:  # process 0 prints the step lines
            lines.append(line)
            if re.search(r"training 2/100000", line):
                procs[1].send_signal(signal.SIGTERM)  # one host is preempted
                break
            assert time.time() < deadline, "no training step in time:\n" + "".join(lines)
        else:
            raise AssertionError("process 0 ended before step 2:\n" + "".join(lines))
    except BaseException:
        mp.kill(procs)
        raise
    sent = time.time()
    outputs = mp.finish(procs, timeout=BOUND, before=("".join(lines), ""))
    assert time.time() - sent < BOUND
    (step,) = mp.steps(workdir)  # one checkpoint: the preemption's, written by both processes
    assert 2 <= step < 100000
    data = sorted(os.listdir(workdir / "checkpoints" / str(step) / "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)
    for i, out in enumerate(outputs):
        agreed = re.findall(r"preemption notice: every process saves step (\d+)", out)
        assert agreed == [str(step)], f"process {i}:\n{out[-3000:]}"

    # Restart: resumes at that step and runs one more (a wrong data position or state shows in
    # it); the uninterrupted run of as many steps goes here meanwhile.
    end = step + 1
    straight = tmp_path / "straight"
    procs = mp.launch(workdir, num_train_steps=end, **RUN)
    procs.append(mp.start_one_process_run(straight, num_train_steps=end, **RUN))
    out = mp.finish(procs, timeout=300)
    assert f"resumed {workdir} at step {step}" in out[0]
    assert mp.steps(workdir)[-1] == end
    expected = mp.restored(straight, end)
    different = mp.differences(expected, mp.restored(workdir, end))
    assert not different, f"{len(different)} of {len(expected)} leaves differ:\n" + "\n".join(
        different[:12]
    )
