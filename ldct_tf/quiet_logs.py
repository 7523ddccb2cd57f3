"""Silence two start-up messages that look like failures on every CPU run, and nothing else.

- TensorFlow on a machine without an NVIDIA driver logs ``E ... cuda_platform.cc:52] failed call to cuInit: ...
  UNKNOWN ERROR (303)`` although nothing is wrong (upstream: tensorflow/tensorflow#37689, "spurious error: failed
  call to cuInit", still printed by TF 2.21).  ``TF_CPP_MIN_LOG_LEVEL=2``, which the tools used to set, hides only
  INFO and WARNING; the line is an ERROR, so on a machine with no NVIDIA driver the level becomes 3.  Where a driver
  exists (a real GPU run) or the user set the variable, nothing changes, so GPU errors are never hidden.
- ``import apache_beam`` without the ``[gcp]`` extra logs ``WARNING:root:apitools not found, and bigquery client
  libraries are not available ...`` through the root logger (Beam's optional-import guard in
  ``apache_beam/io/gcp/internal/clients/bigquery/__init__.py``; upstream: apache/beam#18230, "Clean up import guards
  for GCP libraries in the python SDK").  :func:`import_beam_quietly` imports Beam once with that one message
  filtered, and also removes the handler that the root-logger call installs as a side effect, so that a CLI's own
  ``logging.basicConfig`` still takes effect.

- TensorFlow 2.21's native libraries log while they load, before absl logging is initialised, so no environment
  variable (``TF_CPP_MIN_LOG_LEVEL``, ``ABSL_MIN_LOG_LEVEL``, ``GLOG_minloglevel``) reaches them: ``WARNING: All log
  messages before absl::InitializeLog() is called are written to STDERR``, ``port.cc ... oneDNN custom operations are
  on`` and ``cudart_stub.cc ... Could not find cuda drivers``, each twice (two shared objects carry their own copy of
  the logger).  :func:`quiet_tensorflow` therefore also installs an import hook: the first ``import tensorflow`` runs
  with file descriptor 2 sent to a temporary file, and afterwards every line that is not one of those start-up notices
  is written back to stderr, so a real import error is never hidden.

``ldct_tf/__init__.py`` calls :func:`quiet_tensorflow` (before any module imports TensorFlow) and
``ldct_tf.pipeline/__init__.py`` calls :func:`import_beam_quietly`.  Checked with TensorFlow 2.21.0 and Beam 2.77.0.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
from typing import Iterator, Optional

_NVIDIA_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0")
_BEAM_NOISE = "apitools not found, and bigquery client libraries are not available"
# The notices TensorFlow's native libraries print while they load (see the module docstring); nothing else is dropped.
TF_STARTUP_NOISE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|^I\d{4} [\d:.]+ +\d+ (port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized)"
    r"|^To enable the following instructions: .* in other operations, rebuild TensorFlow")


def nvidia_driver_present() -> bool:
    return any(os.path.exists(path) for path in _NVIDIA_DRIVER_FILES)


def quiet_tensorflow() -> None:
    """Before TensorFlow is imported: set ``TF_CPP_MIN_LOG_LEVEL`` (3 without an NVIDIA driver, else 2; a value the
    user set is kept) and install :class:`QuietTensorflowImport`."""
    if "tensorflow" in sys.modules:
        return
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2" if nvidia_driver_present() else "3"
    if not any(isinstance(finder, QuietTensorflowImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorflowImport())


def drop_startup_noise(text: str) -> str:
    """``text`` without the lines that :data:`TF_STARTUP_NOISE` matches."""
    return "".join(line for line in text.splitlines(keepends=True) if not TF_STARTUP_NOISE.search(line.rstrip("\n")))


@contextlib.contextmanager
def stderr_filtered() -> Iterator[None]:
    """Send file descriptor 2 (what native code writes to) to a temporary file; on exit write back every line that
    is not TensorFlow start-up noise.  On an exception everything is written back."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            kept = text if failed else drop_startup_noise(text)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """Wraps TensorFlow's own loader: the package's ``__init__`` (which loads the native libraries) runs inside
    :func:`stderr_filtered`."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with stderr_filtered():
            self.loader.exec_module(module)


class QuietTensorflowImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook for the top-level ``tensorflow`` package (imported directly or by Keras); it removes
    itself at the first import, so nothing else ever goes through it."""

    def find_spec(self, name: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if name != "tensorflow":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _DropBeamNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _BEAM_NOISE not in record.getMessage()


def import_beam_quietly() -> None:
    """Import ``apache_beam`` with its apitools warning filtered; leave the root logger as it was."""
    if "apache_beam" in sys.modules:
        return
    root = logging.getLogger()
    handlers = list(root.handlers)
    noise = _DropBeamNoise()
    root.addFilter(noise)
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        pass  # the importer will say so when it needs Beam
    finally:
        root.removeFilter(noise)
        for handler in [h for h in root.handlers if h not in handlers]:  # the side effect of logging.warning()
            root.removeHandler(handler)
