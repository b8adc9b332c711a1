"""SIGTERM (preemption): train.py saves a checkpoint at the current step, exits 0, and a restart
on the same workdir resumes from that step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_saves_and_stops_cleanly(tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-u",
        str(REPO / "train.py"),
        "--config=configs/synthetic.py:tiny",
        "--config.num_train_steps=100000",
        "--config.checkpoint_every_steps=100000",
        "--config.log_every_steps=1",
        "--config.image_every_steps=100000",
        f"--workdir={workdir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, deadline = [], time.time() + 400
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"\[3\] D_Fake=", line):
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "no training step within the time limit"
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    log = "".join(lines) + out
    assert proc.returncode == 0, log[-3000:]
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert len(steps) == 1 and 3 <= steps[0] < 100000, steps
    assert "SIGTERM" in log
    # A restart resumes at that step.
    restart = [
        f"--config.num_train_steps={steps[0] + 1}" if a.startswith("--config.num_train") else a
        for a in cmd
    ]
    out = subprocess.run(
        restart,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resumed {workdir} at step {steps[0]}" in out.stdout + out.stderr
