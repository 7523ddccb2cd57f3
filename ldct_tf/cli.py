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


def load_config(args: argparse.Namespace) -> config_lib.Config:
    """The config those arguments name, printed as resolved (a run is reproducible from its log).  A bad one raises
    :class:`ldct_tf.config.ConfigError`, which :func:`run_main` reports as one line."""
    config = config_lib.load(args.config, args.overrides)
    print("Resolved config:\n" + config.to_yaml(), flush=True)
    return config


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--cpu-replicas`` (:func:`ldct_tf.train.loop.make_strategy`) and ``--verbose``, as the training
    and tuning commands take them."""
    parser.add_argument("--data", required=True, help="output folder of python -m ldct_tf.pipeline")
    parser.add_argument("--cpu-replicas", type=int, default=0,
                        help="without GPUs: split the CPU into N logical devices under MirroredStrategy (testing)")
    parser.add_argument("--verbose", type=int, default=1, help="Keras progress: 0 silent, 1 bar, 2 line per epoch")


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
