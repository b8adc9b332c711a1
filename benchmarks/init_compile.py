"""Compile time of the trainer's parameter initialisation with each PRNG: the hash generator that
`runtime.init_key` uses (`clade_jax.training.init_prng`), XLA's RngBitGenerator ("rbg", the key
before 2026-12-02) and JAX's default threefry.

    python benchmarks/init_compile.py [--configs tiny,ade20k,ade20k:norm=spade] [--rounds 2]
                                      [--no_append]

Each cell is a fresh process that builds the initialisation exactly as `train_and_evaluate` does
(`jax.jit(lambda key: nnx.split(GANState(config, n, rngs=nnx.Rngs(key)))[1])`), lowers it and
times `.compile()` with the persistent compilation cache off; the rounds alternate the
generators. Printed: median seconds per cell and the ratios hash / rbg and hash / threefry.
Appends a dated block to benchmarks/RESULTS.md (not with `--no_append`). Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import results as results_md  # benchmarks/results.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("hash", "rbg", "threefry")

_CHILD = """
import json, time
import jax
jax.config.update("jax_enable_compilation_cache", False)
from flax import nnx
from clade_jax.configs import {module} as cfg_module
from clade_jax.training import runtime
from clade_jax.training.state import GANState
config = cfg_module.get_config({arg!r})
impl = {impl!r}
key = runtime.init_key(0) if impl == "hash" else jax.random.key(0, impl={{"rbg": "rbg",
    "threefry": "threefry2x32"}}[impl])
init = jax.jit(lambda k: nnx.split(GANState(config, 16, rngs=nnx.Rngs(k)))[1])
t = time.perf_counter(); lowered = init.lower(key); t_lower = time.perf_counter() - t
t = time.perf_counter(); lowered.compile(); t_compile = time.perf_counter() - t
print("RESULT " + json.dumps({{"lower_s": t_lower, "compile_s": t_compile}}))
"""


def _child(config: str, impl: str) -> dict:
    module, _, arg = config.partition(":")
    if module == "tiny":
        module, arg = "synthetic", "tiny" + ("," + arg if arg else "")
    code = "from clade_jax.backend import configure_cpu_backend\nconfigure_cpu_backend()\n"
    code += _CHILD.format(module=module, arg=arg, impl=impl)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{config} / {impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,ade20k,ade20k:norm=spade")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no_append", action="store_true")
    args = p.parse_args()
    configs = args.configs.split(",")
    times: dict = {(c, i): [] for c in configs for i in IMPLS}
    for r in range(args.rounds):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for c in configs:
            for impl in order:
                res = _child(c, impl)
                times[(c, impl)].append(res["compile_s"])
                print(f"round {r} {c:24s} {impl:9s} compile {res['compile_s']:.1f} s", flush=True)
    rows = []
    for c in configs:
        med = {i: statistics.median(times[(c, i)]) for i in IMPLS}
        rows.append(
            f"| {c} | {med['hash']:.1f} | {med['rbg']:.1f} | {med['threefry']:.1f} | "
            f"{med['hash'] / med['rbg']:.2f} | {med['hash'] / med['threefry']:.2f} |"
        )
    load = os.getloadavg()[0]
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M")
    block = "\n".join(
        [
            f"### init compile, hash vs rbg vs threefry ({stamp}, load {load:.1f})",
            "",
            f"`python benchmarks/init_compile.py --configs {args.configs} --rounds {args.rounds}`:"
            " the trainer's jit-compiled initialisation (`GANState`), compile seconds (median"
            " over rounds, one fresh process per cell, persistent cache off).",
            "",
            "| config | hash s | rbg s | threefry s | hash / rbg | hash / threefry |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    results_md.report(block, append=not args.no_append)


if __name__ == "__main__":
    main()
