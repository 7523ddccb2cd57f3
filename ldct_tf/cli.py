"""What every ``python -m ldct_tf.<stage>`` command shares: the config arguments and one way to end on an error.

Why one place: thirteen commands used to exit on errors in four different ways.  Here a command's ``main`` is
``run_main(parser, work, argv)``: argparse reports usage errors itself (``prog: error: ...``, exit 2); ``work`` calls
the library, and the project's errors (:class:`ldct_tf.errors.LdctError`) and the few expected OS errors (a missing or
unwritable file) become one line ``prog: error: msg`` on stderr and exit code 1, without a traceback.  Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from ldct_tf import config as config_lib
from ldct_tf.errors import LdctError

BAD_INPUT = 1  # the command's input, config or output folder cannot be used
USAGE = 2  # argparse's own code for a command line it cannot parse

# OS errors that mean "this path cannot be used", never a bug: reported as one line naming the path.
EXPECTED_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str, override_example: str) -> None:
    """``--config FILE`` and the ``section.key=value`` overrides, as every config-driven command takes them."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument("overrides", nargs="*", help=f"section.key=value overrides, e.g. {override_example}")


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: print the resolved config.  Why opt-in: it is 70 lines that bury what a run says; the run folder
    keeps it anyway (``config.yaml``, ``metadata.json``)."""
    parser.add_argument("--verbose", action="store_true", help="print the resolved config before starting")


def print_config(config: config_lib.Config, args: argparse.Namespace) -> None:
    """The resolved config on stdout when the command was given ``--verbose``, else nothing."""
    if getattr(args, "verbose", False):
        print("Resolved config:\n" + config.to_yaml(), flush=True)


def load_config(args: argparse.Namespace) -> config_lib.Config:
    """The config those arguments name, printed as resolved with ``--verbose``.  A bad one raises
    :class:`ldct_tf.config.ConfigError`, which :func:`run_main` reports as one line."""
    config = config_lib.load(args.config, args.overrides)
    print_config(config, args)
    return config


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--cpu-replicas`` (:func:`ldct_tf.train.loop.make_strategy`), ``--progress`` and ``--verbose``,
    as the training and tuning commands take them."""
    parser.add_argument("--data", required=True, help="output folder of python -m ldct_tf.pipeline")
    parser.add_argument("--cpu-replicas", type=int, default=0,
                        help="without GPUs: split the CPU into N logical devices under MirroredStrategy (testing)")
    parser.add_argument("--progress", type=int, choices=(0, 1, 2), default=None,
                        help="0 silent, 1 a progress line, 2 a line per epoch (default: a live bar on a terminal, "
                             "plain lines without terminal codes when the output goes to a file)")
    add_verbose_argument(parser)


def stdout_is_terminal() -> bool:
    """Whether stdout is an interactive terminal: the only place where progress bars, carriage returns and colours
    belong (in a log file they are noise and ``\\x1b[`` escapes)."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def progress_level(args: argparse.Namespace) -> int:
    """``--progress`` as given, else 1 (the progress line; a live bar only on a terminal, see
    :func:`ldct_tf.train.loop.progress_bar`)."""
    progress = getattr(args, "progress", None)
    return 1 if progress is None else int(progress)


def error_message(exc: BaseException) -> str:
    """One line for the user: an OS error as ``PATH: reason`` (not Python's ``[Errno 2] ...``), else the message."""
    if isinstance(exc, OSError) and not isinstance(exc, LdctError) and exc.filename is not None:
        return f"{exc.filename}: {(exc.strerror or str(exc)).lower()}"
    return " ".join(str(exc).split()) or type(exc).__name__


def report(prog: str, exc: BaseException) -> int:
    """Print ``prog: error: msg`` on stderr; returns the bad-input exit code."""
    print(f"{prog}: error: {error_message(exc)}", file=sys.stderr, flush=True)
    return BAD_INPUT


def run_main(parser: argparse.ArgumentParser, work: Callable[[argparse.Namespace], Optional[int]],
             argv: Optional[Sequence[str]] = None, *, pass_unknown: bool = False) -> int:
    """Parse ``argv`` (usage errors exit 2, as argparse does), run ``work(args)`` and return its exit code (0 when it
    returns None); a project error or an expected OS error is one line on stderr and exit code 1.

    ``pass_unknown``: options the parser does not know are not an error but land in ``args.unknown`` (the Beam stages
    hand them to Apache Beam: ``--runner``, Dataflow options, ...)."""
    if pass_unknown:
        args, unknown = parser.parse_known_args(argv)
        args.unknown = unknown
    else:
        args = parser.parse_args(argv)
    try:
        code = work(args)
    except (LdctError, *EXPECTED_OS_ERRORS) as exc:
        return report(parser.prog, exc)
    return 0 if code is None else int(code)
