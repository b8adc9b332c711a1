"""Training's periodic evaluation (`loop._evaluate_during_training`) in two `jax.distributed`
processes gives the metrics of the same evaluation in one process.

Both processes call the trainer's periodic evaluation on the same checkpoint, twice, as the
training loop does: the first call builds the evaluators and computes the FID reference
statistics of the evaluated examples (their real images, in the synthesis pass; process 0
caches them), the second reuses the evaluators and reads the cache (its existence decided by
process 0 for both). Each process synthesizes and scores its shard of the examples
(`config.eval.max_images` = 10 in global batches of 4: the last one partly padding); the
confusion matrices are summed and the features gathered across the processes. The networks are
the exact integer stand-ins of `test_evaluators` (a colour-classifying segmenter and per-channel
pixel sums as FID features), injected into `build_evaluators`, so the comparison with the
1-process run (here, on pytest's 8 devices, batch 4 rounded up to 8) is exact for the counts and
to float64 rounding for FID. The processes are launched with `two_processes` (its XLA flags: one
single-threaded CPU device per process, gloo collectives).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import two_processes as mp
from test_evaluate import vivid  # noqa: F401  (the fixture: a VAE workdir with varied images)
from test_evaluators import colour_segmenter, half_sums

from clade_jax.training import checkpoint

# With the other two-process tests on one xdist worker (they would overload the two cores together).
pytestmark = pytest.mark.xdist_group("multihost")

TESTS = Path(__file__).resolve().parent
MAX_IMAGES, BATCH = 10, 4
KEYS = ("num_images", "fid", "confusion", "real_miou", "miou", "pixel_accuracy", "fid_real_stats")


def periodic_evaluations(workdir: str, stats_dir: str) -> list[dict]:
    """The trainer's periodic evaluation of step 0, twice (the second with the evaluators the
    first built), with the stand-in networks; the results each `evaluate` returned here."""
    from clade_jax.evaluation import evaluate as evaluation
    from clade_jax.training import loop

    results = []
    real_build, real_evaluate = evaluation.build_evaluators, evaluation.evaluate

    def build(config, **kwargs):
        return real_build(
            config, inception=(half_sums, {}), segmenter=colour_segmenter(),
            fid_stats_dir=stats_dir, **kwargs,
        )  # fmt: skip

    def evaluate(*args, **kwargs):
        results.append(real_evaluate(*args, **kwargs))
        return results[-1]

    waiting = type("Manager", (), {"wait_until_finished": lambda self: None})()
    evaluation.build_evaluators, evaluation.evaluate = build, evaluate
    try:
        config = checkpoint.load_config(workdir)
        first = loop._evaluate_during_training(waiting, workdir, 0, config)
        again = loop._evaluate_during_training(waiting, workdir, 0, config, first)
        assert again is first
    finally:
        evaluation.build_evaluators, evaluation.evaluate = real_build, real_evaluate
    return [{k: r[k] for k in (*KEYS, "images_dir")} for r in results]


_WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
from clade_jax import distributed
distributed.initialize("127.0.0.1:{port}", 2, {pid})
import jax
assert jax.process_count() == 2 and len(jax.devices()) == 2
import test_multihost_eval as t
print("RESULT", json.dumps(t.periodic_evaluations({workdir!r}, {stats!r})))
"""


def _workdir(vivid_dir: str, path: Path) -> str:
    """A copy of the fixture's workdir whose config evaluates MAX_IMAGES examples at BATCH."""
    shutil.copytree(vivid_dir, path, ignore=shutil.ignore_patterns("eval"))
    config = checkpoint.load_config(str(path))
    config.eval.max_images, config.eval.batch_size = MAX_IMAGES, BATCH
    checkpoint.write_config(config, str(path))
    return str(path)


@pytest.mark.slow(reason="two evaluation processes started and compiling, beside 1 here (~25 s)")
def test_periodic_evaluation_in_two_processes_equals_one_process(vivid, tmp_path):  # noqa: F811
    two_dir = _workdir(vivid, tmp_path / "two")
    port = mp.free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": mp.xla_flags(mp.DEVICES_PER_PROCESS, mp.SINGLE_THREADED),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(mp.REPO),
    }
    code = [
        _WORKER.format(tests=str(TESTS), port=port, pid=i, workdir=two_dir,
                       stats=str(tmp_path / "stats_two"))
        for i in range(2)
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-u", "-c", c],
            cwd=mp.REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for c in code
    ]
    try:  # meanwhile, the same in this process (8 devices)
        one = periodic_evaluations(_workdir(vivid, tmp_path / "one"), str(tmp_path / "stats_one"))
    except BaseException:
        mp.kill(procs)
        raise
    outputs = mp.finish(procs, timeout=240)
    two = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outputs]

    assert two[0] == two[1]  # every process got the same (global) numbers
    for got, want in zip(two[0], one, strict=True):
        assert got["num_images"] == want["num_images"] == MAX_IMAGES
        np.testing.assert_array_equal(np.asarray(got["confusion"]), np.asarray(want["confusion"]))
        assert np.asarray(want["confusion"]).sum() > 0
        assert got["real_miou"] == pytest.approx(want["real_miou"], rel=1e-12)
        assert got["miou"] == pytest.approx(want["miou"], rel=1e-12)
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-9)
    # The second evaluation read the reference statistics process 0 cached: the same FID.
    assert Path(two[0][0]["fid_real_stats"]).is_file()
    assert two[0][1]["fid"] == pytest.approx(two[0][0]["fid"], rel=1e-12)
    # Each example's PNG once (each process wrote its own), the same bytes as in 1 process;
    # the JSON (process 0) holds the global numbers.
    names = sorted(p.name for p in Path(two[0][1]["images_dir"]).iterdir())
    assert len(names) == MAX_IMAGES
    assert names == sorted(p.name for p in Path(one[1]["images_dir"]).iterdir())
    for name in names:
        a, b = (Path(r[1]["images_dir"], name).read_bytes() for r in (two[0], one))
        assert a == b, name
    written = json.loads(Path(two_dir, "eval", "0.json").read_text())
    assert written["confusion"] == two[0][1]["confusion"] and written["fid"] == two[0][1]["fid"]
