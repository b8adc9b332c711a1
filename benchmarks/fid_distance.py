"""The Fréchet distance's matrix square root: pytorch-fid's `scipy.linalg.sqrtm` vs our eigen form.

    python benchmarks/fid_distance.py [--dims 2048] [--samples 64,500,4096] [--no_append]

For each sample count n: two random feature sets (n x D, correlated features, the second shifted),
their float64 statistics (`fid.statistics`), then the trace Tr sqrtm(sigma1 sigma2) three ways:
pytorch-fid's (`scipy.linalg.sqrtm`, real part of the trace), ours (`fid.frechet_distance`, which
forms it from eigenvalues; its trace is recovered from the distance), and an exact reference.
The reference for n < D is the n x n eigenproblem of the centred samples A (the non-zero
eigenvalues of sigma1 sigma2 are those of A sigma2 A^T / (n - 1)); for n >= D there is no
smaller problem and the reference is sqrtm itself (the column then shows the two forms' agreement).
Prints the times (one call each, alternating sqrtm / ours) and the relative errors of the trace,
and appends a dated block to benchmarks/RESULTS.md (not with `--no_append`). Timing needs a quiet
machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np
import scipy.linalg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import results as results_md  # noqa: E402  (benchmarks/results.py)

from clade_jax.evaluation import fid  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--samples", default="64,500,4096")
    parser.add_argument("--no_append", action="store_true")
    args = parser.parse_args()
    d = args.dims
    rng = np.random.default_rng(0)
    rows = []
    for n in (int(s) for s in args.samples.split(",")):
        a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.05
        b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.05 + 0.1
        (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)
        t = time.perf_counter()
        tr_sqrtm = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
        t_sqrtm = time.perf_counter() - t
        t = time.perf_counter()
        distance = fid.frechet_distance(mu1, s1, mu2, s2)
        t_ours = time.perf_counter() - t
        tr_ours = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - distance) / 2
        if n < d:
            centred = a - a.mean(axis=0)
            small = np.linalg.eigvalsh(centred @ s2 @ centred.T / (n - 1))
            exact, kind = np.sqrt(np.clip(small, 0.0, None)).sum(), "n x n eigenproblem"
        else:
            exact, kind = tr_sqrtm, "sqrtm"
        errors = [(tr - exact) / exact for tr in (tr_sqrtm, tr_ours)]
        rows.append((n, kind, t_sqrtm, t_ours, *errors))
    stamp = datetime.datetime.now().isoformat(timespec="minutes")
    lines = [
        f"### Frechet distance, sqrtm vs eigen form, D = {d} ({stamp}, load "
        f"{os.getloadavg()[0]:.2f})",
        "",
        "`python benchmarks/fid_distance.py`: one call each per sample count; trace errors "
        "relative to the reference.",
        "",
        "| samples | reference | sqrtm s | ours s | ours / sqrtm | sqrtm trace error "
        "| ours trace error |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, kind, ts, to, es, eo in rows:
        lines.append(
            f"| {n} | {kind} | {ts:.2f} | {to:.2f} | {to / ts:.3f} | {es:.1e} | {eo:.1e} |"
        )
    results_md.report("\n".join(lines) + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
