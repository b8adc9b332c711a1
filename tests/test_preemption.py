"""SIGTERM (preemption): train.py saves a checkpoint at the current step, exits 0, and a restart
on the same workdir resumes from that step. Its console output is what a person reads: a few
lines of ours (start, devices, parameters, one line per logged step with losses, speed and ETA,
checkpoints), no library INFO noise."""

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
            if re.search(r"training 3/100000: D_Fake=", line):
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
    restart_log = out.stdout + out.stderr
    assert f"resumed {workdir} at step {steps[0]}" in restart_log
    # The console: our lines only. The restart's: start, devices, resume, the step line with
    # losses and speed, the checkpoint; orbax / absl / jax INFO lines are off.
    lines = restart_log.splitlines()
    assert len(lines) <= 8, restart_log
    final = steps[0] + 1
    assert re.search(rf"training {final}/{final}: D_Fake=\S+ .*G_GAN=\S+ .*steps/s", restart_log)
    assert f"checkpoint step {final} -> " in restart_log
    assert re.search(r"training on \d+ devices in 1 processes", restart_log)
    # The preempted run's step lines: one per step (log_every_steps=1) with speed and ETA.
    first = [ln for ln in log.splitlines() if re.search(r"training \d+/100000: ", ln)]
    assert len(first) >= 3 and all(re.search(r"steps/s, ETA \d", ln) for ln in first[1:])
    assert not re.search(r"orbax|checkpoint_manager|absl", log + restart_log), log + restart_log
