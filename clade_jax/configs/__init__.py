"""clade_jax configs: one `get_config(arg)` file per dataset (common.py holds the shared defaults).

A config is named by a *spec*: a name, a path or either with `:arg` after it. All of these give the
same config (`load`, and the `--config` flag `DEFINE_config` defines for the entry points):

    ade20k                       a config of this package, by name
    ade20k.py                    the same file name
    configs/ade20k.py            the path the repository used to have (relative to the repository)
    clade_jax/configs/ade20k.py  the path inside the repository
    /any/path/my_config.py       any file with a `get_config(arg=None)` (loaded from that path)
    ade20k:norm=spade,tiny       anything above with the config's `arg` after the colon

The package's configs are always imported as `clade_jax.configs.<name>`, however they are named,
so the installed wheel serves them without the repository.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import types

import ml_collections
from absl import flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_PREFIXES = ("clade_jax/configs/", "configs/")  # repository-relative spellings of this folder


def names() -> list[str]:
    """The configs this package holds (file names without `.py`, `common` excluded)."""
    return sorted(
        f[:-3]
        for f in os.listdir(_HERE)
        if f.endswith(".py") and not f.startswith("_") and f != "common.py"
    )


def split_spec(spec: str) -> tuple[str, str | None]:
    """'ade20k.py:tiny' -> ('ade20k.py', 'tiny'); no colon -> (spec, None)."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def _package_name(path: str) -> str | None:
    """The name of the package config `path` spells, or None when it is some other file."""
    if os.path.isfile(path):
        full = os.path.abspath(path)
        if os.path.dirname(full) == _HERE and full.endswith(".py"):
            return os.path.basename(full)[:-3]
        return None
    p = path.replace(os.sep, "/")
    for prefix in _PREFIXES:
        if p.startswith(prefix) or p.startswith("./" + prefix):
            p = p.split(prefix, 1)[1]
            break
    if p.endswith(".py"):
        p = p[:-3]
    return p if "/" not in p and p in names() + ["common"] else None


def config_module(path: str) -> types.ModuleType:
    """The module a spec's path part names (see the module docstring).

    Raises:
      FileNotFoundError: neither a config of this package nor an existing file; the message lists
        the package's configs.
    """
    name = _package_name(path)
    if name is not None:
        return importlib.import_module(f"{__name__}.{name}")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config {path!r}: no such file, and not a clade_jax config "
            f"(known: {', '.join(names())})"
        )
    module_name = "clade_jax_user_config_" + os.path.basename(path).removesuffix(".py")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(spec: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of `spec` ('ade20k', 'configs/ade20k.py:tiny', '/my/config.py:x', ...).

    `arg` is used when the spec has no `:arg` of its own (an argument in both is an error).
    """
    path, spec_arg = split_spec(spec)
    if spec_arg is not None and arg is not None:
        raise ValueError(f"config {spec!r}: an argument both after the colon and as arg={arg!r}")
    module = config_module(path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config {path!r} ({module.__file__}) has no get_config(arg)")
    chosen = spec_arg if spec_arg is not None else arg
    return module.get_config(chosen or None)


class _SpecParser(flags.ArgumentParser):
    """absl parser of a config spec: `load`, then lock (errors raise at once, naming the spec)."""

    def parse(self, spec):
        if isinstance(spec, ml_collections.ConfigDict):
            return spec
        config = load(spec)
        config.lock()
        return config

    def flag_type(self):
        return "config object"


def DEFINE_config(  # noqa: N802 (absl's naming)
    name: str = "config",
    default: str | None = None,
    help_string: str = "",
    *,
    flag_values=None,
    sys_argv=None,
):
    """An absl flag taking a config spec (module docstring), with ml_collections' overrides.

    `--config=ade20k:tiny --config.batch_size=4` works as with `config_flags.DEFINE_config_file`
    (it is that flag with `load` as its parser); the config is locked. `flag_values` and
    `sys_argv` are config_flags' (tests pass their own).
    """
    flag_values = flags.FLAGS if flag_values is None else flag_values
    holder = config_flags.DEFINE_config_file(
        name,
        default,
        help_string or f"a config: a name ({', '.join(names())}) or a .py path, then [:arg]",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=sys_argv,
    )
    flag_values[name].parser = _SpecParser()
    return holder
