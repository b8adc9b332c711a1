"""Evaluation throughput: the whole `evaluate()` (synthesis + Inception + segmenter), old vs new.

    python benchmarks/evaluation.py [--images 64] [--batch 16] [--rounds 2] [--old_commit SHA]
                                    [--no_append]
    python benchmarks/evaluation.py --quick      # smoke run on tiny sizes; appends nothing

* Work (equal for both): a synthetic-config generator (ngf 16, 64x64, random weights with its
  output convolution scaled so the images vary), `--images` validation examples at batch
  `--batch`, pytorch-fid's Inception on the synthesized AND the real images (a fresh FID cache
  folder per call, so the reference statistics are computed every time), and the builtin U-Net
  segmenter (random weights, widths 16/32/64) on the synthesized and the real images.
* "before": `clade_jax/evaluation/evaluate.py` as it was before the evaluators (the newest
  commit whose evaluate.py does not use them, or `--old_commit`), run from a
  `git worktree add /tmp/old_eval <commit>` checkout with this venv (its TensorFlow-based clu
  writer is stubbed out: TensorFlow is not installed). It evaluates on one device.
* "after": this checkout, on 1 host device and on 8 (`--xla_force_host_platform_device_count`).
* "after, ..., reference statistics cached (less work)": the new code on 1 device with the FID
  cache folder kept across calls, i.e. what every evaluation of a split after its first one
  does (periodic evaluation during training, re-evaluating a checkpoint): the real images'
  Inception pass is read from `<fid_stats_dir>/..._n<count>_<H>x<W>.npz` instead of being run.
  Not equal work (the real images' U-Net pass, for the `real_miou` row, still runs); it is
  reported beside the equal-work rows, not instead of them.
* Every configuration runs with the convolutions the entry points choose (evaluate.py and
  train.py call `clade_jax.backend.configure_cpu_backend`: Eigen instead of jaxlib's default
  YNNPACK, `--xla_cpu_experimental_ynn_fusion_type=`; since 2026-12-01 19:30 also the
  memory-minimizing scheduler). Blocks in RESULTS.md before 2026-12-01
  17:00 ran on jaxlib's default (YNNPACK), which runs Inception at about half the speed on this
  CPU (143 against 68-74 ms per image at batch 8).
* Each configuration runs in its own process, `--rounds` alternating rounds (medians reported):
  a warm-up evaluate() of N images, then N and 2N. The Frechet distance at the end of every
  evaluate() is timed on its own (`fid.frechet_distance` wrapped): it costs the same whatever N
  (a 2048x2048 eigenproblem, or the old code's `scipy.linalg.sqrtm` at 17-25 s here), so with it
  inside, t(2N) - t(N) is the difference of two large, noisy numbers (the 2026-12-02 blocks gave
  2.98x and 1.14x for the same code). Two rates: the loop's, N / ((t(2N) - d(2N)) - (t(N) -
  d(N))) with d the distance's time, so compilation, set-up and the distance cancel; and the
  whole evaluation's, N / t(N), everything after the warm-up included. Peak host memory (max RSS)
  after the N and the 2N call: flat memory means the two agree. Programs lowered per call (each
  a trace + lowering + compilation or persistent-cache read; `jax.monitoring`): the new code's
  timed calls should lower none beyond what a new image count changes.

Appends a dated block to benchmarks/RESULTS.md (not with `--no_append` or `--quick`: `--quick`
is a check that the benchmark runs, 8 images at batch 8, not a measurement). Timing needs a quiet
machine: nothing else running.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import results as results_md  # noqa: E402  (benchmarks/results.py)

from clade_jax import backend  # noqa: E402  (only its flag name: JAX is not started here)

OLD = "/tmp/old_eval"
CACHED = "after, 1 device, reference statistics cached (less work)"
WORK = "/tmp/clade_eval_bench"

_PREPARE = """
import jax
from flax import nnx
from clade_jax.configs import synthetic
from clade_jax.training import checkpoint
from clade_jax.training.state import GANState
config = synthetic.get_config("tiny")
config.model.ngf = 16
config.model.generator = "spade"  # the old name (still read by the new code), for the old code
config.data.synthetic_val_size = {val}
checkpoint.write_config(config, {workdir!r})
init = jax.jit(lambda key: nnx.split(GANState(config, 16, rngs=nnx.Rngs(key)))[1])
state = init(jax.random.key(0, impl="rbg"))
kernel = state["gen"]["g"]["conv_img"]["kernel"]
kernel.set_value(kernel[...] * 4.0)
manager = checkpoint.make_manager({workdir!r}, with_data=False)
checkpoint.save(manager, 0, state, force=True)
manager.wait_until_finished()
manager.close()
"""

_CHILD = """
import json, resource, sys, tempfile, time, types
if {old}:  # the old evaluate writes with clu's TensorFlow writer: stub it
    stub = types.ModuleType("clu.metric_writers")
    class _W:
        def __getattr__(self, name):
            return lambda *a, **k: None
    stub.create_default_writer = lambda *a, **k: _W()
    sys.modules["clu.metric_writers"] = stub
    clu = sys.modules.setdefault("clu", types.ModuleType("clu"))  # clu is no longer installed
    clu.metric_writers = stub
import jax
from clade_jax.evaluation.evaluate import evaluate
from clade_jax.evaluation.segmenter import NNXSegmenter, SegmenterNet, init_rngs
lowered = []  # programs traced and lowered (then compiled or read from the persistent cache)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **kw: lowered.append(1)
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None
)
from clade_jax.evaluation import fid as fid_lib
distance_s = []  # the time of the final Frechet distance (a fixed cost per evaluation)
_distance = fid_lib.frechet_distance
def timed_distance(*args, **kwargs):
    t = time.perf_counter()
    out = _distance(*args, **kwargs)
    distance_s.append(time.perf_counter() - t)
    return out
fid_lib.frechet_distance = timed_distance  # both evaluate()s call it through the module
seg = NNXSegmenter(SegmenterNet(10, widths=(16, 32, 64), depth=1, rngs=init_rngs(0)))
times, rss, programs, distances = [], [], [], []
stats_dir = tempfile.mkdtemp()  # the FID cache kept across calls ({cached}): see the docstring
# Warm-up (compiles), then N and 2N images; cached: two warm-ups, which store the reference
# statistics of both counts, so that the timed calls run no real-image Inception.
warm_ups = ({images}, 2 * {images}) if {cached} else ({images},)
calls = warm_ups + ({images}, 2 * {images})
for n in calls:
    t = time.perf_counter()
    evaluate({workdir!r}, max_images=n, batch_size={batch}, segmenter=seg,
             fid_stats_dir=stats_dir if {cached} else tempfile.mkdtemp())
    times.append(time.perf_counter() - t)
    distances.append(sum(distance_s))
    distance_s.clear()
    rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    programs.append(len(lowered))
    lowered.clear()
print("RESULT", json.dumps({{"times": times, "distance_s": distances, "rss_mb": rss,
                            "programs": programs}}))
"""


def git(*args: str, cwd: str = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def old_commit() -> str:
    """The newest commit whose evaluate.py predates the evaluators."""
    for sha in git("log", "--format=%H", "--", "clade_jax/evaluation/evaluate.py").split():
        text = git("show", f"{sha}:clade_jax/evaluation/evaluate.py")
        if "evaluation.evaluators" not in text:
            return sha
    raise RuntimeError("no commit with the old evaluate.py")


def run(code: str, *, cwd: str, devices: int) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": cwd,
        # The entry points' CPU flags (`clade_jax.backend.configure_cpu_backend`: Eigen, not
        # jaxlib's default YNNPACK, and the memory-minimizing scheduler), for old and new alike.
        "XLA_FLAGS": " ".join(
            [f"--xla_force_host_platform_device_count={devices}"]
            + [f"{k}={v}" for k, v in backend.CPU_FLAGS.items()]
        ),
        "JAX_PLATFORMS": "cpu",
        # The old evaluate() compiles at every call, the new one once per process (its programs
        # are cached in memory); the persistent cache makes the old code's timed calls load the
        # warm-up's executables, as its repeated evaluations did in practice.
        "JAX_COMPILATION_CACHE_DIR": os.path.join(WORK, "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"benchmark child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (medians)")
    parser.add_argument("--old_commit", default=None)
    parser.add_argument(
        "--no_append", action="store_true", help="print the table only (no RESULTS.md block)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 8 images at batch 8, nothing appended"
    )
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch, args.rounds, args.no_append = 8, 8, 1, True

    sha = args.old_commit or old_commit()
    if not os.path.isdir(OLD):
        git("worktree", "add", "--detach", OLD, sha)
    elif git("rev-parse", "HEAD", cwd=OLD).strip() != sha:
        git("checkout", "--detach", sha, cwd=OLD)
    workdir = os.path.join(WORK, f"gan_val{2 * args.images}")  # the 2N call needs 2N examples
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        os.makedirs(WORK, exist_ok=True)
        code = _PREPARE.format(workdir=workdir, val=2 * args.images)
        run(code, cwd=REPO, devices=8)

    def child(old: bool, images: int, cached: bool) -> str:
        return _CHILD.format(
            old=old, workdir=workdir, images=images, batch=args.batch, cached=int(cached)
        )

    configs = [  # name, old code, checkout, host devices, FID reference statistics cached
        ("before (old evaluate, 1 device)", True, OLD, 8, False),
        ("after, 1 device", False, REPO, 1, False),
        ("after, 8 devices", False, REPO, 8, False),
        (CACHED, False, REPO, 1, True),
    ]
    load0 = os.getloadavg()
    results = {name: [] for name, *_ in configs}
    for _ in range(args.rounds):  # alternating rounds: old, new 1, new 8, old, ...
        for name, old, cwd, devices, cached in configs:
            results[name].append(run(child(old, args.images, cached), cwd=cwd, devices=devices))
    load1 = os.getloadavg()
    n = args.images

    def loop_rate(r: dict) -> float:
        """Images/s of the per-batch work: the extra N images of the 2N call, distance excluded."""
        t, d = r["times"], r["distance_s"]
        return n / ((t[-1] - d[-1]) - (t[-2] - d[-2]))

    def whole_rate(r: dict) -> float:
        """Images/s of one whole timed evaluate() of N images, set-up and distance included."""
        return n / r["times"][-2]

    median = lambda rs, f: statistics.median(f(r) for r in rs)
    base_loop = median(results[configs[0][0]], loop_rate)
    base_whole = median(results[configs[0][0]], whole_rate)
    lines = [
        f"### evaluation, old vs new ({datetime.datetime.now().isoformat(timespec='minutes')})",
        "",
        textwrap.fill(
            f"`python benchmarks/evaluation.py --images {n} --batch {args.batch} --rounds "
            f"{args.rounds}` (old = {sha[:10]}): synthetic generator ngf 16 at 64x64, pytorch-fid "
            "Inception on the synthesized and the real images, builtin U-Net (16/32/64) on both, "
            "(the cached row: the reference statistics read from the FID cache, which its "
            "two warm-up calls fill for both counts), "
            "the entry points' XLA:CPU flags (Eigen convolutions, memory-minimizing scheduler) in "
            f"every process; {args.rounds} alternating round(s) of one process per configuration, "
            f"medians over rounds. Per process: a warm-up evaluate() of {n} images (cached: of {n} "
            f"and {2 * n}), then {n} and {2 * n}. Loop images/s = {n} / (time of {2 * n} - time "
            f"of {n}), each minus its "
            "Frechet distance, so compilation, set-up and the fixed-cost distance cancel; whole "
            f"images/s = {n} / time of the {n}-image call (set-up and distance included). Peak RSS "
            f"after the {n}- and the {2 * n}-image calls. Load average {load0[0]:.2f} at start, "
            f"{load1[0]:.2f} at end.",
            100,
        ),
        "",
        f"| configuration | s, {n} images | s, {2 * n} images | Frechet distance, s "
        f"| loop images/s | vs before | whole images/s ({n}) | vs before "
        f"| peak RSS MB ({n} / {2 * n}) | programs lowered (warm-up(s) / {n} / {2 * n}) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    each = lambda rs, f, fmt: " / ".join(format(f(r), fmt) for r in rs)
    for name, *_ in configs:
        rs = results[name]
        lines.append(
            f"| {name} | {each(rs, lambda r: r['times'][-2], '.1f')} "
            f"| {each(rs, lambda r: r['times'][-1], '.1f')} "
            f"| {each(rs, lambda r: max(r['distance_s'][-2:]), '.1f')} "
            f"| {each(rs, loop_rate, '.2f')} | {median(rs, loop_rate) / base_loop:.2f}x "
            f"| {each(rs, whole_rate, '.2f')} | {median(rs, whole_rate) / base_whole:.2f}x "
            f"| {each(rs, lambda r: r['rss_mb'][-2], '.0f')} / "
            f"{each(rs, lambda r: r['rss_mb'][-1], '.0f')} "
            f"| {' ; '.join(' / '.join(str(c) for c in r['programs']) for r in rs)} |"
        )
    results_md.report("\n".join(lines) + "\n", append=not args.no_append)
    if args.no_append:
        print("(not appended to benchmarks/RESULTS.md: --no_append / --quick)")


if __name__ == "__main__":
    main()
