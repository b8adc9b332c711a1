"""The entry points' console and user errors (`clade_jax.cli`).

A user error (missing VGG weights, a bad flag value, a wrong option) ends with one paragraph that
names the flag as typed and exit code 2, no traceback; `--traceback` shows it; a bug keeps its
traceback. Library INFO lines stay off the console unless `--verbosity` asks for them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from clade_jax import cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def test_missing_vgg_weights_is_one_paragraph_and_exit_2(tmp_path):
    args = [
        "train.py",
        "--config=synthetic:tiny",
        f"--workdir={tmp_path}",
        "--config.loss.lambda_vgg=10",
        "--config.loss.vgg_weights=/nonexistent/vgg19.pth",
    ]
    out = _run(args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, out.stderr
    assert "--config.loss.vgg_weights" in errors[0] and "/nonexistent/vgg19.pth" in errors[0]
    # --traceback shows where it happened.
    shown = _run([*args, "--traceback"])
    assert shown.returncode != 0 and "Traceback" in shown.stderr
    assert "load_vgg19" in shown.stderr


def test_bad_flag_value_names_the_flag_and_exits_2(tmp_path):
    out = _run(
        ["train.py", "--config=synthetic:tiny", f"--workdir={tmp_path}", "--config.seed=abc"]
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "--config.seed=abc" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


_SCRIPT = """
import sys
from absl import flags
from clade_jax import cli

flags.DEFINE_string("label_encoding", "ids", "how label PNGs encode classes")
flags.DEFINE_string("kind", "user", "user | bug")


def main(argv):
    if flags.FLAGS.kind == "user":
        raise ValueError(
            "labels.png: values [200] outside [0, 10) (pass label_encoding='dataset' for the\\n"
            "data set's own encoding)"
        )
    raise RuntimeError("an internal bug")


cli.run(main)
"""


def test_user_error_names_flags_as_typed_and_a_bug_keeps_its_traceback(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text(_SCRIPT)
    out = _run([str(script)], timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()  # one paragraph
    assert line.startswith("tool.py: error: labels.png: values [200] outside [0, 10)")
    assert "pass --label_encoding=dataset for the data set's own encoding" in line
    bug = _run([str(script), "--kind=bug"], timeout=60)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "an internal bug" in bug.stderr


def test_as_typed_rewrites_options_into_flags():
    msg = "set label_encoding='dataset' or label_encoding=\"ids\"; see config.loss.vgg_weights"
    assert cli.as_typed(msg, ["label_encoding"], ["config"]) == (
        "set --label_encoding=dataset or --label_encoding=ids; see --config.loss.vgg_weights"
    )
    # Not inside other names, paths or already-typed flags.
    msg = "my_label_encoding='x' /data/configs/config.py --config.seed=1 x.config.y"
    assert cli.as_typed(msg, ["label_encoding"], ["config"]) == msg


def _record(name: str, level: int, pathname: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, "message", None, None)


def test_console_filter_keeps_ours_and_drops_library_info():
    ours = os.path.join(os.path.dirname(cli.__file__), "training", "loop.py")
    orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    quiet = cli._ConsoleFilter(0, entry_point="/repo/train.py")
    assert quiet.filter(_record("clade_jax.training.loop", logging.INFO, ours))
    assert quiet.filter(_record("absl", logging.INFO, ours))  # absl logging called from our code
    assert quiet.filter(_record("absl", logging.INFO, "/repo/train.py"))
    assert not quiet.filter(_record("absl", logging.INFO, orbax))
    assert not quiet.filter(_record("jax._src.xla_bridge", logging.INFO, "/venv/jax/x.py"))
    assert quiet.filter(_record("absl", logging.WARNING, orbax))
    assert not quiet.filter(_record("clade_jax.training.loop", logging.DEBUG, ours))
    loud = cli._ConsoleFilter(1, entry_point=None)
    assert loud.filter(_record("absl", logging.INFO, orbax))
    assert loud.filter(_record("jax", logging.DEBUG, "/venv/jax/x.py"))
    warnings_only = cli._ConsoleFilter(-1, entry_point=None)
    assert not warnings_only.filter(_record("clade_jax.training.loop", logging.INFO, ours))
    assert warnings_only.filter(_record("absl", logging.WARNING, orbax))


def test_progress_prints_step_lines_plain_lines_and_a_bar(caplog, capsys):
    from clade_jax.training.runtime import Progress

    log = logging.getLogger("clade_jax.test_progress")
    with caplog.at_level(logging.INFO, logger="clade_jax.test_progress"):
        # Off a terminal: a plain line whenever every_s has passed, and the step lines.
        with Progress(10, "training", initial=2, every_s=0.0, bar=False, logger=log) as p:
            p.update()  # 3/10: a plain periodic line
            speed = p.log(4, {"G_GAN": 0.5, "D_real": 1.25})
            p.update(6)  # the end: no periodic line at 10/10
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("training 3/10 | ") and "steps/s, ETA" in lines[0]
    assert lines[1].startswith("training 4/10: G_GAN=0.5 D_real=1.25 | ") and "ETA" in lines[1]
    assert len(lines) == 2 and set(speed) == {"steps_per_sec", "uptime"}
    # On a terminal: a tqdm bar with counts and rate on stderr.
    with Progress(5, "segmenter", bar=True, logger=log) as p:
        p.update(3)
    err = capsys.readouterr().err
    assert "segmenter" in err and "3/5" in err and "step/s" in err


# Each `python -m clade_jax....` entry point: a user error found before any model is built.
_ENTRY_POINT_ERRORS = {
    "synthesize": (
        ["-m", "clade_jax.synthesize", "--workdir={tmp}", "--labels={tmp}", "--out={tmp}/out"]
        + ["--num_samples=0"],
        "python -m clade_jax.synthesize: error: --num_samples=0: must be >= 1",
    ),
    "convert": (
        ["-m", "clade_jax.convert", "--official_dir={tmp}/official", "--workdir={tmp}/out"],
        "python -m clade_jax.convert: error: {tmp}/official/opt.txt does not exist",
    ),
    "paint": (
        ["-m", "clade_jax.paint", "--workdir={tmp}/run"],
        "python -m clade_jax.paint: error: --workdir={tmp}/run holds no config.json",
    ),
    "prepare": (
        ["-m", "clade_jax.data.prepare", "--dataset=ade20k", "--source_dir={tmp}/ade"]
        + ["--data_dir={tmp}/tfds"],
        "python -m clade_jax.data.prepare: error: --source_dir={tmp}/ade is not a directory",
    ),
    "ade20k_outdoor": (
        ["-m", "clade_jax.data.ade20k_outdoor", "--root={tmp}/ade", "--out={tmp}/outdoor"],
        "python -m clade_jax.data.ade20k_outdoor: error: --root={tmp}/ade is not a directory",
    ),
}


def test_every_module_entry_point_ends_a_user_error_with_one_paragraph_and_exit_2(tmp_path):
    # All at once (each is a Python start-up, ~2.5 s of CPU), checked one by one.
    procs = {}
    for name, (args, _) in _ENTRY_POINT_ERRORS.items():
        work = tmp_path / name
        work.mkdir()
        cmd = [sys.executable, *(a.format(tmp=work) for a in args)]
        procs[name] = subprocess.Popen(
            cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        expected = _ENTRY_POINT_ERRORS[name][1].format(tmp=tmp_path / name)
        assert proc.returncode == 2, (name, err[-3000:])
        assert "Traceback" not in err, (name, err)
        (line,) = err.strip().splitlines()  # one paragraph
        assert line.startswith(expected), (name, line)
        assert line.endswith("(--traceback shows where it happened)"), (name, line)
    # Nothing was written for the failed runs.
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(_ENTRY_POINT_ERRORS)
