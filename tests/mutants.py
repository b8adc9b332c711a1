"""Deliberately broken copies of the library, to check that the tests catch each break.

Each mutant is a text edit (old -> new, each `old` found exactly once) of one library module's
current source. The edit is applied in memory only: loaded as a pytest plugin (`-p mutants`,
with `CLADE_MUTANT=<name>`), this module re-executes the edited source in the module's namespace
before any test module is collected, and rebinds the names other library modules imported from
it. The files on disk are never touched, so a run cannot leave a break behind in a working tree
that others share.

    python tests/mutants.py                 # every mutant, its tests; prints a Markdown table
    python tests/mutants.py vgg_wrong_tap   # one of them

A mutant that some test does not catch is a gap in the tests (tests/MUTATIONS.md lists the
results). If an `old` text no longer matches the library, the run says so: update the edit.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (module, [(old, new), ...], the tests that must catch it)
MUTANTS = {
    # The harness itself: an edit that changes nothing must leave every test passing.
    "control_comment_only": (
        "clade_jax.models.vgg",
        [("# relu1_1, relu2_1, relu3_1, relu4_1, relu5_1", "# (control) relu1_1 .. relu5_1")],
        ["tests/test_vgg.py"],
    ),
    "grads_scaled_by_device_count": (
        "clade_jax.training.step",
        [
            (
                "    fn = functools.partial(\n",
                "    global _SCALE\n    _SCALE = batch_sharding.mesh.size\n"
                "    fn = functools.partial(\n",
            ),
            (
                "    model.opt_g.update(model.gen, g_grads)\n",
                "    g_grads = jax.tree.map(lambda g: g * _SCALE, g_grads)\n"
                "    model.opt_g.update(model.gen, g_grads)\n",
            ),
            (
                "    model.opt_d.update(model.d, d_grads)\n",
                "    d_grads = jax.tree.map(lambda g: g * _SCALE, d_grads)\n"
                "    model.opt_d.update(model.d, d_grads)\n",
            ),
        ],
        ["tests/test_training.py", "-k", "one_device or one_step or ema_generator"],
    ),
    "lr_g_and_lr_d_swapped": (
        "clade_jax.training.state",
        [
            (
                "self.gen, make_optimizer(config.optim.lr_g, config, factor)",
                "self.gen, make_optimizer(config.optim.lr_d, config, factor)",
            ),
            (
                "self.d, make_optimizer(config.optim.lr_d, config, factor)",
                "self.d, make_optimizer(config.optim.lr_g, config, factor)",
            ),
        ],
        ["tests/test_training.py", "-k", "one_device or one_step or ema_generator"],
    ),
    "d_update_skipped": (
        "clade_jax.training.step",
        [("    model.opt_d.update(model.d, d_grads)\n", "    del d_grads  # mutant\n")],
        ["tests/test_training.py", "-k", "one_device or one_step or ema_generator"],
    ),
    "ema_update_skipped": (
        "clade_jax.training.step",
        [("        update_ema(model.g_ema, model.gen.g, ema_decay)\n", "        pass  # mutant\n")],
        ["tests/test_training.py", "-k", "one_device or one_step or ema_generator"],
    ),
    "label_encoding_ignored": (
        "clade_jax.synthesize",
        [('    if encoding == "dataset":\n', "    if False:  # mutant\n")],
        ["tests/test_synthesize.py", "-k", "dataset_encoding"],
    ),
    "vgg_wrong_tap": (
        "clade_jax.models.vgg",
        [("SLICE_ENDS = (0, 5, 10, 19, 28)", "SLICE_ENDS = (0, 7, 10, 19, 28)")],  # relu2_2
        ["tests/test_vgg.py"],
    ),
    "bf16_returns_zeros": (
        "clade_jax.layers.conv",
        [
            (
                "            y = y / sigma.astype(self.dtype)\n        if self.bias is not None:\n"
                "            y = y + self.bias[...].astype(self.dtype)\n        return y\n",
                "            y = y / sigma.astype(self.dtype)\n        if self.bias is not None:\n"
                "            y = y + self.bias[...].astype(self.dtype)\n"
                "        if self.dtype == jnp.bfloat16:  # mutant\n"
                "            y = jnp.zeros_like(y)\n        return y\n",
            )
        ],
        ["tests/test_layers.py", "-k", "bfloat16"],
    ),
    "label_255_to_ignored": (
        "clade_jax.data.decoding",
        [("            label[is_255] = self.label_255_to\n", "            pass  # mutant\n")],
        ["tests/data/test_dataset_encodings.py", "tests/data/test_data_sources.py"],
    ),
    "nan_check_removed": (
        "clade_jax.training.loop",
        [("                check_finite(scalars, done)\n", "")],
        ["tests/test_training.py", "-k", "nan"],
    ),
    # SPADE's windowed modulation: a window of one convolution instead of two, and the edge
    # channel left out of the tables.
    "spade_windows_radius_of_one_conv": (
        "clade_jax.layers.spade_windows",
        [("    r = 2 * (kernel_size // 2)\n", "    r = kernel_size // 2\n")],
        ["tests/test_spade_windows.py"],
    ),
    "spade_windows_edge_table_without_edge": (
        "clade_jax.layers.spade_windows",
        [
            (
                "pre = jnp.concatenate([pre, pre + sums[num_classes]])",
                "pre = jnp.concatenate([pre, pre])",
            )
        ],
        ["tests/test_spade_windows.py"],
    ),
    # The trainer's "auto" choice of the windowed modulation: the threshold compared the wrong
    # way, and the iterator not put back after the batch the choice read.
    "spade_windows_auto_inverted": (
        "clade_jax.models.build",
        [
            (
                "interior >= spade_windows.AUTO_MIN_INTERIOR",
                "interior < spade_windows.AUTO_MIN_INTERIOR",
            )
        ],
        ["tests/test_spade_windows.py"],
    ),
    "spade_windows_auto_consumes_a_batch": (
        "clade_jax.training.loop",
        [
            (
                '    labels = next(iterator)["label"]\n    iterator.set_state(position)\n',
                '    labels = next(iterator)["label"]\n',
            )
        ],
        ["tests/test_spade_windows.py"],
    ),
    "taps_input_grad_unflipped_taps": (
        "clade_jax.layers.conv",
        [
            (
                "tap = gp[:, k - 1 - i : k - 1 - i + h, k - 1 - j : k - 1 - j + wd, :]",
                "tap = gp[:, i : i + h, j : j + wd, :]",
            )
        ],
        ["tests/test_fast_conv.py"],
    ),
    "phases_input_grad_unflipped_subkernels": (
        "clade_jax.layers.conv",
        [
            (
                "kernel = jnp.flip(sub, (0, 1)).transpose(0, 1, 3, 2)",
                "kernel = sub.transpose(0, 1, 3, 2)",
            )
        ],
        ["tests/test_fast_conv.py"],
    ),
    "phases_input_grad_never_chosen": (
        "clade_jax.layers.conv",
        [("c >= 16 and size >= LATE_INPUT_BYTES", "c >= 16 and size < 0")],
        ["tests/test_fast_conv.py"],
    ),
    "taps_input_grad_never_chosen": (
        "clade_jax.layers.conv",
        [("pixels <= 24 * 24", "pixels < 0")],
        ["tests/test_fast_conv.py"],
    ),
}


def mutated_source(name: str) -> tuple[str, str, str]:
    """(module name, file path, edited source) of mutant `name`."""
    module, edits, _ = MUTANTS[name]
    path = REPO / (module.replace(".", "/") + ".py")
    source = path.read_text()
    for old, new in edits:
        n = source.count(old)
        if n != 1:
            raise RuntimeError(f"mutant {name}: {old!r} occurs {n} times in {path}; update it")
        source = source.replace(old, new)
    return module, str(path), source


def install(name: str) -> None:
    """Re-execute the module with the mutated source, in place, and rebind the names other
    library modules imported from it (`from m import f`) to the mutated objects. Done before
    any test module is imported, so nothing has captured the originals otherwise."""
    module_name, path, source = mutated_source(name)
    module = importlib.import_module(module_name)
    before = dict(vars(module))
    exec(compile(source, path, "exec"), vars(module))
    replaced = {
        id(old): vars(module)[key]
        for key, old in before.items()
        if key in vars(module)
        and vars(module)[key] is not old
        and (callable(old) or isinstance(old, (tuple, list, dict, set, frozenset)))
    }
    for other in list(sys.modules.values()):
        if other is module or not getattr(other, "__name__", "").startswith("clade_jax"):
            continue
        for key, value in list(vars(other).items()):
            if id(value) in replaced:
                setattr(other, key, replaced[id(value)])


def pytest_configure(config):
    """Plugin hook: install the mutant named by $CLADE_MUTANT."""
    name = os.environ.get("CLADE_MUTANT")
    if name:
        install(name)


def run(name: str) -> tuple[bool, list[str], float]:
    """Run mutant `name`'s tests: (caught, failing test ids, seconds)."""
    mutated_source(name)  # fail early if an edit no longer applies
    _, _, tests = MUTANTS[name]
    env = {
        **os.environ,
        "CLADE_MUTANT": name,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mutants", "-rf"]
        + tests,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    failed = re.findall(r"^FAILED (\S+)", out.stdout, re.M)
    errors = re.findall(r"^ERROR (\S+)", out.stdout, re.M)
    if out.returncode not in (0, 1) or errors:
        raise RuntimeError(f"mutant {name}: pytest did not run cleanly:\n{out.stdout[-3000:]}")
    return bool(failed), failed, time.monotonic() - start


def main(names: list[str]) -> int:
    names = names or list(MUTANTS)  # the control first
    print("| mutant | caught | failing tests |\n|---|---|---|")
    missed = 0
    for name in names:
        caught, failed, _ = run(name)
        missed += caught if name.startswith("control") else not caught
        tests = ", ".join(f"`{f.split('/')[-1]}`" for f in failed) or "**none**"
        if name.startswith("control"):
            verdict = "**YES (harness broken)**" if caught else "no (as it must)"
        else:
            verdict = "yes" if caught else "**NO**"
        print(f"| {name} | {verdict} | {tests} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
