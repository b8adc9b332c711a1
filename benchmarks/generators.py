"""Generator speed on CPU: CLADE vs SPADE vs pix2pixHD vs the convolution-only floor, and XLA's
conv back-ends.

Times, in one process with alternating rounds (CLADE, SPADE, pix2pixHD, floor, CLADE, ...), the
jit-compiled

* inference as `clade_jax.synthesize` runs it (`model.eval()`: BatchNorm running statistics,
  spectral norm folded into the kernels once by `fold_spectral_norm`),
* the same inference with spectral norm recomputed from the stored vectors on every call (the
  unfolded module, what a plain `model.eval()` forward does; `--no_unfolded` skips it), and
* one training forward + backward (train mode, `jax.grad` of the mean output w.r.t. the Params,
  updated BatchNorm statistics / spectral-norm vectors returned as well)

of the full-size ADE20k generators (151 classes, batch 1, 256x256): CLADE (`configs/ade20k.py`),
SPADE (`norm=spade`), the pix2pixHD baseline (`generator=pix2pixhd`) and the CLADE network with
every normalization layer removed (`norm=none`, the convolution-only floor). It prints the
medians, the ratios CLADE/SPADE, CLADE/floor, pix2pixHD/CLADE and folded/unfolded, and appends
them to `benchmarks/RESULTS.md` with the date, jax version, device, load average and XLA_FLAGS.

`--backend_compare` instead runs the benchmark in subprocesses that alternate between XLA:CPU's
Eigen convolutions (what `clade_jax.backend.configure_cpu_backend` selects:
`--xla_cpu_experimental_ynn_fusion_type=`) and YNNPACK (jaxlib 0.10's default;
`CLADE_JAX_KEEP_XLA_FLAGS=1` and the flag absent), since a flag cannot change inside a process,
and reports the per-model ratios Eigen / YNNPACK (medians over the subprocess runs).

    python benchmarks/generators.py [--rounds N] [--infer_rounds N] [--no_train] [--no_unfolded]
    python benchmarks/generators.py --backend_compare [--runs N] [--rounds N] [--no_train]

Each call is timed twice: wall-clock time, and the process's CPU time (`time.process_time`, all
threads). On a machine shared with other jobs the wall time of one call can double from round to
round while its CPU time moves by a few percent, so the CPU-time ratios are the steadier
measurement there; on an idle machine the two agree in ratio. Read the ratios (measured within one
process), not the absolute milliseconds, and look at the recorded load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "RESULTS.md")
MODELS = {
    "CLADE": "",
    "SPADE": "norm=spade",
    "pix2pixHD": "generator=pix2pixhd",
    "floor": "norm=none",
}
MODES = {"infer": "inference", "unfolded": "inference, SN per call", "train": "train fwd+bwd"}
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, help="timed training rounds (default 5; compare: 2)")
    p.add_argument("--infer_rounds", type=int, help="inference rounds (default 10; compare: 5)")
    p.add_argument("--no_train", action="store_true", help="time inference only")
    p.add_argument("--no_unfolded", action="store_true", help="skip the unfolded inference")
    p.add_argument("--backend_compare", action="store_true", help="Eigen vs YNNPACK subprocesses")
    p.add_argument("--runs", type=int, default=2, help="subprocess runs per back-end (compare)")
    p.add_argument("--models", default=",".join(MODELS), help="subset of " + ",".join(MODELS))
    p.add_argument("--no_append", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # worker output
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.backend_compare else 5
    if args.infer_rounds is None:
        args.infer_rounds = 5 if args.backend_compare else 10
    return args


def load_average() -> str:
    """The 1 / 5 / 15-minute load averages, as recorded with every result."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _backend_name() -> str:
    """Which XLA:CPU convolution back-end XLA_FLAGS selects."""
    m = re.search(YNN_FLAG + r"=(\S*)", os.environ.get("XLA_FLAGS", ""))
    if m is None:
        return "YNNPACK (jaxlib default)"
    return "Eigen" if m.group(1) == "" else f"ynn fusion type {m.group(1)!r}"


def _median_ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(
    rounds: int, infer_rounds: int, train: bool, models: list[str], unfolded: bool = True
) -> dict:
    """Build the generators, compile, and time alternating rounds; returns medians in ms."""
    sys.path.insert(0, REPO)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from clade_jax.configs import ade20k
    from clade_jax.evaluation.complexity.timing import compiled_forward, time_rounds, warm_up
    from clade_jax.models.build import build_generator

    labels = jax.random.randint(jax.random.key(1), (1, 256, 256), 0, 151, dtype=jnp.int32)
    fns = {}  # (model, mode) -> zero-argument callable returning its output
    for name in models:
        model = build_generator(ade20k.get_config(MODELS[name] or None), rngs=nnx.Rngs(0))
        if train:
            model.train()
            gdef, params, rest = nnx.split(model, nnx.Param, ...)

            def loss(p, r, y, gdef=gdef):
                m = nnx.merge(gdef, p, r, copy=True)  # fresh Variables at the grad level
                out = m(y)
                return jnp.mean(out), nnx.state(m, nnx.Not(nnx.Param))

            step = jax.jit(jax.grad(loss, has_aux=True))
            fns[name, "train"] = lambda s=step, p=params, r=rest: s(p, r, labels)
        # Inference exactly as the complexity table's runtime column times it.
        fns[name, "infer"] = compiled_forward(model, {"labels": labels})
        if unfolded:
            fns[name, "unfolded"] = compiled_forward(model, {"labels": labels}, fold=False)

    # compile + first run, second warm-up run
    compile_s = {"/".join(k): round(s, 1) for k, s in warm_up(fns, runs=2).items()}

    # Inference and training are timed in separate phases (a 20 s SPADE training step between two
    # inference calls evicts caches and makes the inference numbers noisier); within a phase the
    # models (and the folded / unfolded inference) alternate, one call each per round.
    wall, cpu = {}, {}
    loads = [load_average()]
    for modes, n in ((("infer", "unfolded"), infer_rounds), (("train",), rounds)):
        phase = {key: f for key, f in fns.items() if key[1] in modes}
        if not phase:
            continue
        times = time_rounds(phase, n, after_round=lambda: loads.append(load_average()))
        wall.update({key: t["wall"] for key, t in times.items()})
        cpu.update({key: t["cpu"] for key, t in times.items()})
    wall = {key: wall[key] for key in fns}  # the models' order
    cpu = {key: cpu[key] for key in fns}
    return {
        "ms": {"/".join(k): round(_median_ms(v), 1) for k, v in wall.items()},
        "cpu_ms": {"/".join(k): round(_median_ms(v), 1) for k, v in cpu.items()},
        "all_ms": {"/".join(k): [round(1e3 * x) for x in v] for k, v in wall.items()},
        "all_cpu_ms": {"/".join(k): [round(1e3 * x) for x in v] for k, v in cpu.items()},
        "warmup_s": compile_s,
        "loads": loads,
        "rounds": rounds,
        "infer_rounds": infer_rounds,
        "jax": jax.__version__,
        "device": f"{jax.devices()[0].device_kind} ({cpu_name()}, {os.cpu_count()} cores)",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "backend": _backend_name(),
    }


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a and b else "-"


def report(res: dict) -> str:
    lines = [
        f"### generators, {res['backend']} convolutions "
        f"({datetime.datetime.now().isoformat(timespec='minutes')})",
        "",
        f"jax {res['jax']}, {res['device']}, XLA_FLAGS=`{res['xla_flags']}`, "
        f"alternating rounds ({res['infer_rounds']} inference"
        + (f", then {res['rounds']} training" if any("/train" in k for k in res["ms"]) else "")
        + "), "
        "medians; load average (1/5/15 min) "
        f"{res['loads'][0]} at start, {res['loads'][-1]} at end. Inference folds spectral norm "
        '(as `clade_jax.synthesize`); "SN per call" is the unfolded module.',
        "",
        "| batch 1, 256x256 | " + " | ".join(f"{m} ms" for m in MODELS) + " | CLADE/SPADE | "
        "CLADE/floor | pix2pixHD/CLADE |",
        "|---" * (len(MODELS) + 4) + "|",
    ]
    for mode, mode_label in MODES.items():
        for clock, ms in (("wall", res["ms"]), ("CPU time", res["cpu_ms"])):
            v = {m: ms.get(f"{m}/{mode}") for m in MODELS}
            if all(x is None for x in v.values()):
                continue
            cells = " | ".join("-" if x is None else f"{x:.0f}" for x in v.values())
            ratios = [("CLADE", "SPADE"), ("CLADE", "floor"), ("pix2pixHD", "CLADE")]
            cells += "".join(f" | {_ratio(v[a], v[b])}" for a, b in ratios)
            lines.append(f"| {mode_label}, {clock} | {cells} |")
    folded = [
        f"{m} {_ratio(res['cpu_ms'].get(f'{m}/infer'), res['cpu_ms'].get(f'{m}/unfolded'))}"
        for m in MODELS
        if f"{m}/unfolded" in res["cpu_ms"]
    ]
    if folded:
        lines += ["", "Folded / unfolded inference, CPU time: " + ", ".join(folded) + "."]
    return "\n".join(lines) + "\n"


def backend_compare(args: argparse.Namespace) -> str:
    """Alternate Eigen / YNNPACK worker subprocesses; ratios of their medians."""
    base = os.environ.get("XLA_FLAGS", "")
    base = " ".join(f for f in base.split() if not f.startswith(YNN_FLAG))
    envs = {
        "Eigen": dict(os.environ, XLA_FLAGS=f"{base} {YNN_FLAG}=".strip()),
        "YNNPACK": dict(os.environ, XLA_FLAGS=base, CLADE_JAX_KEEP_XLA_FLAGS="1"),
    }
    # Runs after the first of each back-end reuse its compiled executables (the flags are part of
    # the cache key), which keeps the comparison within minutes; run times are unaffected.
    cache = os.path.join(tempfile.gettempdir(), "clade_jax_benchmark_cache")
    for env in envs.values():
        env["JAX_COMPILATION_CACHE_DIR"] = cache
    cmd = [sys.executable, os.path.abspath(__file__), "--json", f"--rounds={args.rounds}"]
    cmd.append(f"--infer_rounds={args.infer_rounds}")
    cmd.append(f"--models={args.models}")
    if args.no_train:
        cmd.append("--no_train")
    if args.no_unfolded:
        cmd.append("--no_unfolded")
    runs = {b: [] for b in envs}
    for i in range(args.runs):
        for backend, env in envs.items():
            print(f"run {i + 1}/{args.runs}: {backend} ...", flush=True)
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            print(report(res), flush=True)
            runs[backend].append(res)
    keys = list(runs["Eigen"][0]["ms"])
    med = {  # (clock, back-end) -> {model/mode: median over runs of each run's median}
        (clock, b): {k: statistics.median(r[clock][k] for r in rs) for k in keys}
        for clock in ("ms", "cpu_ms")
        for b, rs in runs.items()
    }
    first = runs["Eigen"][0]
    one_min = [float(r["loads"][i].split()[0]) for rs in runs.values() for r in rs for i in (0, -1)]
    lines = [
        f"### generators, Eigen vs YNNPACK convolutions "
        f"({datetime.datetime.now().isoformat(timespec='minutes')})",
        "",
        f"jax {first['jax']}, {first['device']}; {args.runs} alternating subprocess runs per "
        f"back-end (Eigen, YNNPACK, Eigen, ...), {args.infer_rounds} inference"
        + ("" if args.no_train else f" and {args.rounds} training")
        + " rounds each; medians over runs of "
        f"each run's median. Eigen: XLA_FLAGS=`{envs['Eigen']['XLA_FLAGS']}`; YNNPACK: "
        f"XLA_FLAGS=`{envs['YNNPACK']['XLA_FLAGS']}`, CLADE_JAX_KEEP_XLA_FLAGS=1. 1-minute load "
        f"average {min(one_min):.2f} to {max(one_min):.2f} during the runs.",
        "",
        "| batch 1, 256x256 | clock | Eigen ms | YNNPACK ms | Eigen/YNNPACK | Eigen runs | "
        "YNNPACK runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        model, mode = k.split("/")
        name = f"{model} {MODES[mode]}"
        for clock, label in (("ms", "wall"), ("cpu_ms", "CPU time")):
            e, y = med[clock, "Eigen"][k], med[clock, "YNNPACK"][k]
            per = [", ".join(f"{r[clock][k]:.0f}" for r in runs[b]) for b in envs]
            lines.append(
                f"| {name} | {label} | {e:.0f} | {y:.0f} | {_ratio(e, y)} | {per[0]} | {per[1]} |"
            )
    lines.append("")
    for b in envs:
        for mode, label in MODES.items():
            for clock, clock_label in (("ms", "wall"), ("cpu_ms", "CPU time")):
                c, s, f = (med[clock, b].get(f"{m}/{mode}") for m in ("CLADE", "SPADE", "floor"))
                if c is not None:
                    lines.append(
                        f"* {b} {label} ({clock_label}): CLADE/SPADE {_ratio(c, s)}, "
                        f"CLADE/floor {_ratio(c, f)}"
                    )
    return "\n".join(lines) + "\n"


HEADER = """# Benchmark results

Appended by the scripts in `benchmarks/` (newest last). Every ratio is measured within one process
(or, for back-end comparisons, between alternating subprocesses) with alternating rounds and
medians; the machine may be shared, so absolute milliseconds are noisy: compare ratios and look at
the load average recorded with each entry. "wall" is wall-clock time per call, "CPU time" the
process's CPU time per call (all threads): under load from other jobs the latter is much steadier.

* `python benchmarks/generators.py [--infer_rounds N] [--rounds N] [--no_train] [--models ...]`
  (~7 minutes on a loaded 2-core machine): jit inference (eval mode, spectral norm folded as
  `clade_jax.synthesize` does, and unfolded) and one training forward+backward (train mode, grad
  of the mean output w.r.t. the Params) of the full-size ADE20k generators, batch 1, 256x256:
  CLADE, SPADE, pix2pixHD and the convolution-only floor (`norm=none`: every normalization layer
  removed). Ratios CLADE/SPADE, CLADE/floor, pix2pixHD/CLADE, folded/unfolded.
* `python benchmarks/generators.py --backend_compare [--runs N] [--models CLADE,floor]
  [--no_train]`: the same in subprocesses that alternate XLA:CPU's Eigen convolutions (what
  `configure_cpu_backend` selects) and YNNPACK (jaxlib's default); ratios Eigen/YNNPACK. About 12
  minutes with all three models and training; `--no_train` or `--models` shorten it.
"""


def append(text: str) -> None:
    new = not os.path.exists(RESULTS)
    with open(RESULTS, "a") as f:
        if new:
            f.write(HEADER)
        f.write("\n" + text)


def main(argv=None) -> None:
    args = _parse(argv)
    if args.backend_compare:
        text = backend_compare(args)
    else:
        models = [m for m in args.models.split(",") if m]
        if unknown := set(models) - set(MODELS):
            raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from {list(MODELS)}")
        res = measure(
            args.rounds,
            args.infer_rounds,
            train=not args.no_train,
            models=models,
            unfolded=not args.no_unfolded,
        )
        if args.json:
            print(json.dumps(res), flush=True)
            return
        for key in res["all_ms"]:
            print(f"{key:12s} wall {res['all_ms'][key]}  CPU {res['all_cpu_ms'][key]}")
        print("warm-up (compile + 2 calls) s:", res["warmup_s"], "\nload averages:", res["loads"])
        text = report(res)
    print(text)
    if not args.no_append:
        append(text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    from clade_jax.backend import configure_cpu_backend

    configure_cpu_backend()
    main()
