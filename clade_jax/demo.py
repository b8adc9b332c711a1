"""`make demo`: CLADE learns the built-in synthetic scenes on this CPU, and the numbers show it.

    python -m clade_jax.demo --workdir=workdirs/demo

1. Trains CLADE (`configs/synthetic.py`, also checkpointing step 0) into `<workdir>/clade`:
   TensorBoard logs and sample grids (label | synthesized | real) under it.
2. Trains the built-in segmenter on the synthetic photos (`configs/segmenter.py`) into
   `<workdir>/segmenter`, so that synthesized images get mIoU / pixel accuracy.
3. Evaluates the step-0 initialization and the trained generator on the validation scenes: FID
   with the real pytorch-fid Inception weights, mIoU and pixel accuracy with that segmenter.
4. Prints the table and the paths, and writes them to `<workdir>/results.md`.

An existing workdir is resumed (training) and re-evaluated, so an interrupted demo continues.
The console shows each phase as it starts and ends (with its wall time), the training step lines
(losses, steps/s, ETA; a progress bar on a terminal) and the evaluation results.
"""

from __future__ import annotations

import logging
import os
import time

from absl import flags

FLAGS = flags.FLAGS
log = logging.getLogger(__name__)
PHASES = 4


def _phase(number: int, what: str) -> float:
    log.info("demo phase %d/%d: %s", number, PHASES, what)
    return time.time()


def _done(number: int, start: float) -> float:
    seconds = time.time() - start
    log.info("demo phase %d/%d done in %.1f min", number, PHASES, seconds / 60)
    return seconds


def run(workdir: str, *, steps: int | None = None, segmenter_steps: int = 600) -> dict:
    """Run the demo into `workdir`; returns {'step0': eval dict, 'trained': eval dict, ...}."""
    from clade_jax.configs import segmenter, synthetic
    from clade_jax.evaluation.evaluate import evaluate
    from clade_jax.evaluation.segmenter import train_segmenter
    from clade_jax.training import train_and_evaluate

    timings = {}
    config = synthetic.get_config()
    config.save_initial_checkpoint = True
    config.keep_checkpoints = 10
    if steps:
        config.num_train_steps = steps
    gan_dir = os.path.join(workdir, "clade")
    t = _phase(1, f"training CLADE on the synthetic scenes ({config.num_train_steps} steps)")
    train_and_evaluate(config, gan_dir)
    timings["train_clade_s"] = _done(1, t)

    seg_dir = os.path.join(workdir, "segmenter")
    seg_config = segmenter.get_config(f"dataset=synthetic,width=16,steps={segmenter_steps},batch=8")
    seg_config.data.num_workers = 0
    t = _phase(2, f"training the segmenter that scores the images ({segmenter_steps} steps)")
    train_segmenter(seg_config, seg_dir)
    timings["train_segmenter_s"] = _done(2, t)

    results = {}
    timings["evaluate_s"] = 0.0
    for number, (name, step, what) in enumerate(
        (("step0", 0, "the step-0 initialization"), ("trained", None, "the trained generator")),
        start=3,
    ):
        t = _phase(number, f"evaluating {what}: FID, mIoU, pixel accuracy")
        results[name] = evaluate(gan_dir, step=step, segmenter_workdir=seg_dir)
        timings["evaluate_s"] += _done(number, t)
    results["timings"] = timings
    table = format_results(results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\nsamples:      {os.path.join(gan_dir, 'samples')}")
    print(f"eval images:  {os.path.join(gan_dir, 'eval')}")
    print(f"TensorBoard:  pip install tensorboard; tensorboard --logdir {workdir}")
    return results


def format_results(results: dict) -> str:
    """The demo's markdown table: step 0 vs trained, and the real photos as the reference."""
    s0, tr = results["step0"], results["trained"]
    rows = [
        "| synthetic scenes, validation | FID (lower is better) | mIoU | pixel accuracy |",
        "|---|---|---|---|",
        f"| CLADE at step 0 (initialization) | {s0['fid']:.1f} | {s0.get('miou', float('nan')):.3f}"
        f" | {s0.get('pixel_accuracy', float('nan')):.3f} |",
        f"| CLADE after {tr['step']} steps | {tr['fid']:.1f} | {tr.get('miou', float('nan')):.3f}"
        f" | {tr.get('pixel_accuracy', float('nan')):.3f} |",
        f"| real photos (segmenter reference) | 0 | {tr.get('real_miou', float('nan')):.3f} | "
        f"{tr.get('real_pixel_accuracy', float('nan')):.3f} |",
    ]
    t = results.get("timings", {})
    if t:
        rows.append("")
        h, w = tr["resolution"]
        rows.append(
            f"{tr['num_images']} validation images at {h}x{w}; wall time: CLADE training "
            f"{t['train_clade_s'] / 60:.1f} min, segmenter {t['train_segmenter_s'] / 60:.1f} min, "
            f"evaluation {t['evaluate_s'] / 60:.1f} min."
        )
    return "\n".join(rows)


def main(argv):
    del argv
    run(FLAGS.workdir, steps=FLAGS.steps, segmenter_steps=FLAGS.segmenter_steps)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "workdirs/demo", "where the demo writes")
    flags.DEFINE_integer("steps", None, "override the CLADE training steps")
    flags.DEFINE_integer("segmenter_steps", 600, "segmenter training steps")
    from clade_jax.backend import configure_cpu_backend

    configure_cpu_backend()
    from clade_jax import cli

    cli.run(main)
