"""What every command-line entry point shares: console logging, user errors, `--traceback`.

    from clade_jax import cli
    ...
    if __name__ == "__main__":
        cli.run(main)          # instead of absl's app.run(main)

* Console: clade_jax's own lines at INFO (start, devices, steps, checkpoints, results), everything
  else (orbax, absl, jax, grain, ...) only from WARNING up. absl's `--verbosity` / `-v` changes
  it: 1 shows every library's INFO (and DEBUG) lines and tracebacks, -1 only warnings. Lines are
  written through tqdm, so they do not break a progress bar on the terminal.
* User errors: a bad flag, or a ValueError / OSError / FloatingPointError / NotImplementedError
  raised by the run (missing weights, a label out of range, a NaN loss, a wrong option) end with
  one paragraph on stderr and exit code 2, no traceback (`--traceback` or `-v 1` shows it). The
  message names options as they are typed on the command line: `label_encoding='dataset'` in a
  library message becomes `--label_encoding=dataset`, `config.loss.vgg_weights` becomes
  `--config.loss.vgg_weights`.

Nothing happens on import except defining `--traceback`: entry points call `run` or
`setup_logging`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

from clade_jax import backend

FLAGS = flags.FLAGS
if "traceback" not in FLAGS:
    flags.DEFINE_bool("traceback", False, "show the Python traceback of a user error")

# Exceptions a user's input causes; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,  # bad option values, bad data (clade_jax.data.DataError), missing weights
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FloatingPointError,  # a loss became NaN: labels out of range, divergence
    NotImplementedError,  # an option combination that is not supported
)
EXIT_USER_ERROR = 2

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_HANDLER_NAME = "clade_jax.console"


class _ConsoleFilter(logging.Filter):
    """Our records from INFO up; other libraries' from WARNING up (all of them with -v 1)."""

    def __init__(self, verbosity: int, entry_point: str | None):
        super().__init__()
        self.verbosity = verbosity
        self.entry_point = entry_point

    def _ours(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("clade_jax") or record.name == "__main__":
            return True
        path = os.path.abspath(record.pathname) if record.pathname else ""
        return path.startswith(_PACKAGE_DIR + os.sep) or path == self.entry_point

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbosity >= 1:
            return True
        if record.levelno >= logging.WARNING:
            return True
        return self.verbosity == 0 and record.levelno >= logging.INFO and self._ours(record)


class _ConsoleHandler(logging.Handler):
    """Writes through `tqdm.write` (keeps progress bars intact) to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        record.level_prefix = level
        return super().format(record)


def setup_logging(verbosity: int = 0) -> None:
    """Console logging for an entry point (see the module docstring); idempotent.

    Args:
      verbosity: absl's `--verbosity`: 0 our INFO lines, >= 1 every library's, < 0 warnings only.
    """
    root = logging.getLogger()
    absl_handler = absl_logging.get_absl_handler()
    if absl_handler in root.handlers:
        root.removeHandler(absl_handler)
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = _ConsoleHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_Formatter("%(asctime)s %(level_prefix)s%(message)s", "%H:%M:%S"))
    entry = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else None
    handler.addFilter(_ConsoleFilter(verbosity, entry))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    absl_logging.set_verbosity(absl_logging.DEBUG if verbosity >= 1 else absl_logging.INFO)
    if verbosity < 1:
        # XLA / TSL's own C++ INFO lines (read when the backend starts).
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def as_typed(message: str, flag_names: Sequence[str] = (), config_flags: Sequence[str] = ()):
    """Rewrite a library message so options read as command-line flags.

    `name='value'` / `name="value"` / `name=value` for each name in `flag_names` becomes
    `--name=value`; `config.a.b` for each config flag name becomes `--config.a.b`.
    """
    for name in sorted(flag_names, key=len, reverse=True):
        quoted = rf"(?<![\w.\-]){re.escape(name)}=(?:'([^']*)'|\"([^\"]*)\"|([^\s,;:)'\"]+))"
        message = re.sub(
            quoted,
            lambda m, n=name: f"--{n}={next(g for g in m.groups() if g is not None)}",
            message,
        )
    for name in config_flags:
        message = re.sub(rf"(?<![\w./\-]){re.escape(name)}\.(?=\w)", f"--{name}.", message)
    return message


def _program_flags() -> tuple[list[str], list[str]]:
    """(the flags defined outside absl, those of them that hold a ConfigDict)."""
    import ml_collections

    names, configs = [], []
    for module, module_flags in FLAGS.flags_by_module_dict().items():
        if module.startswith("absl"):
            continue
        for f in module_flags:
            names.append(f.name)
            if isinstance(f.value, ml_collections.ConfigDict):
                configs.append(f.name)
    return names, configs


def program_name(argv0: str | None = None) -> str:
    """How the user started the program: `python -m clade_jax.x` for a module of the package
    (`sys.argv[0]` is then its file), else the script's file name."""
    argv0 = argv0 if argv0 is not None else (sys.argv[0] if sys.argv else "")
    if not argv0:
        return "clade_jax"
    path = os.path.abspath(argv0)
    if path.startswith(_PACKAGE_DIR + os.sep) and path.endswith(".py"):
        rel = os.path.relpath(path[: -len(".py")], os.path.dirname(_PACKAGE_DIR))
        module = rel.replace(os.sep, ".").removesuffix(".__main__")
        return f"python -m {module}"
    return os.path.basename(argv0) if os.sep in argv0 else argv0


def user_error_message(error: BaseException, program: str | None = None) -> str:
    """The one paragraph printed for a user error."""
    program = program or program_name()
    names, configs = _program_flags()
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, FileNotFoundError) and error.filename and error.filename not in text:
        text = f"{text}: {error.filename}"
    text = as_typed(text, names, configs)
    return f"{program}: error: {text} (--traceback shows where it happened)"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag ending in one paragraph and exit code 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(
            f"{program_name(argv[0] if argv else None)}: error: {' '.join(str(e).split())} "
            "(--helpshort lists the flags)",
            file=sys.stderr,
        )
        sys.exit(EXIT_USER_ERROR)
    except USER_ERRORS as e:  # e.g. a config file that cannot be loaded
        if "--traceback" in argv:
            raise
        print(user_error_message(e, program_name(argv[0] if argv else None)), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """`absl.app.run(main)` with this module's logging, user errors and `--traceback`; first
    the entry points' CPU back-end choice (`clade_jax.backend.configure_cpu_backend`)."""
    backend.configure_cpu_backend()  # before JAX initialises its backends

    def wrapped(args: list[str]):
        setup_logging(FLAGS.verbosity)
        try:
            return main(args)
        except USER_ERRORS as e:
            if FLAGS.traceback or FLAGS.verbosity >= 1:
                raise
            logging.shutdown()
            program = program_name((argv or sys.argv or [""])[0])
            print(user_error_message(e, program), file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    app.run(wrapped, argv=argv, flags_parser=_parse_flags)
