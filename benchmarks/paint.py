"""The painting app's latency: request-to-image vs the bare generator call, and the first request.

Serves a randomly initialized full-size CLADE generator of the ADE20k config (151 classes,
256x256, `clade_jax.configs.ade20k`, eval mode, spectral norm folded) with `clade_jax.paint` on
uvicorn (127.0.0.1, free port) and times, in alternating rounds in one process:

* request-to-image: POST /api/synthesize with a 256x256 8-bit label PNG, the response PNG read
  and decoded (what the page waits for after a stroke: PNG decode, validation, synthesis, PNG
  encode, HTTP both ways; the page's own JS PNG encoding is not included);
* the bare generator call: the same `InferenceModel` called on the same map already in memory
  (what `clade_jax.synthesize` does per batch of 1), output fetched to NumPy.

It also times the first request of a fresh server (`--no_warmup` serving: compilation included)
and reports it minus the steady-state request median. Prints the medians and the ratio
request / bare (target <= 1.3) and appends them to `benchmarks/RESULTS.md` with the date, jax
version, device and load average.

    python benchmarks/paint.py [--rounds 10] [--no_append]
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import statistics
import time

from generators import RESULTS, cpu_name, load_average  # this folder's (run as a script)


def label_map(seed: int, size: int = 256):
    """A blocky random ADE20k-like map: 8x8 cells of random classes, upsampled; (size, size)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 150, (8, 8))
    return np.kron(cells, np.ones((size // 8, size // 8), np.int64)).astype(np.uint8)


def measure(rounds: int) -> dict:
    """Time the first request, then `rounds` alternating request / bare-call pairs."""
    import httpx
    import numpy as np
    from flax import nnx
    from PIL import Image

    from clade_jax.configs import ade20k
    from clade_jax.inference import InferenceModel
    from clade_jax.models.build import build_generator
    from clade_jax.paint.server import PaintModel, create_app, serve_in_thread

    config = ade20k.get_config()
    g = build_generator(config, rngs=nnx.Rngs(0))
    g.eval()
    net = InferenceModel(g)
    model = PaintModel(config, net, "random init (ADE20k config)")
    assert (model.height, model.width) == (256, 256), (model.height, model.width)
    maps = [label_map(k) for k in range(4)]
    bodies = []
    for m in maps:
        buf = io.BytesIO()
        Image.fromarray(m).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    out = {"load_start": load_average()}
    with serve_in_thread(create_app(model)) as url, httpx.Client(base_url=url, timeout=600) as c:

        def request(k: int) -> float:
            t = time.perf_counter()
            resp = c.post("/api/synthesize", content=bodies[k % len(bodies)])
            resp.raise_for_status()
            image = np.asarray(Image.open(io.BytesIO(resp.content)))
            dt = time.perf_counter() - t
            assert image.shape == (256, 256, 3)
            return dt

        def bare(k: int) -> float:
            labels = maps[k % len(maps)].astype(np.int32)[None]
            t = time.perf_counter()
            np.asarray(net(labels))
            return time.perf_counter() - t

        out["first_request_s"] = request(0)
        bare(0)  # same compiled function: warm already
        reqs, bares = [], []
        for k in range(rounds):
            reqs.append(request(k + 1))
            bares.append(bare(k + 1))
    out["request_ms"] = 1e3 * statistics.median(reqs)
    out["bare_ms"] = 1e3 * statistics.median(bares)
    out["ratio"] = out["request_ms"] / out["bare_ms"]
    out["compile_s"] = out["first_request_s"] - out["request_ms"] / 1e3
    out["rounds"] = rounds
    out["load_end"] = load_average()
    return out


def main(argv=None) -> None:
    """CLI: measure, print, append to RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="alternating timed rounds")
    p.add_argument("--no_append", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)
    import jax

    r = measure(args.rounds)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M")
    text = (
        f"\n### paint app latency ({stamp})\n\n"
        f"`python benchmarks/paint.py --rounds {r['rounds']}`: jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind} ({cpu_name()}, {os.cpu_count()} cores), "
        f"XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`; load average (1/5/15 min) "
        f"{r['load_start']} at start, {r['load_end']} at end. Full-size CLADE (ADE20k config, "
        "random init, spectral norm folded), batch 1, 256x256; medians of alternating rounds.\n\n"
        "| 256x256 CLADE | ms |\n|---|---|\n"
        f"| request to image (POST label PNG -> decoded photo PNG) | {r['request_ms']:.0f} |\n"
        f"| bare generator call (`InferenceModel`, map in memory) | {r['bare_ms']:.0f} |\n"
        f"| ratio request / bare (target <= 1.3) | {r['ratio']:.3f} |\n"
        f"| first request of a fresh server (compilation included) | "
        f"{1e3 * r['first_request_s']:.0f} |\n"
        f"| of which compilation (first minus steady request) | {1e3 * r['compile_s']:.0f} |\n"
    )
    print(text)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write(text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
