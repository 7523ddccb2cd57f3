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

``ldct_tf/__init__.py`` calls :func:`quiet_tensorflow` (before any module imports TensorFlow) and
``ldct_tf.pipeline/__init__.py`` calls :func:`import_beam_quietly`.  Checked with TensorFlow 2.21.0 and Beam 2.77.0.
"""

from __future__ import annotations

import logging
import os
import sys

_NVIDIA_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0")
_BEAM_NOISE = "apitools not found, and bigquery client libraries are not available"


def nvidia_driver_present() -> bool:
    return any(os.path.exists(path) for path in _NVIDIA_DRIVER_FILES)


def quiet_tensorflow() -> None:
    """Set ``TF_CPP_MIN_LOG_LEVEL`` before TensorFlow is imported: 3 without an NVIDIA driver, else 2."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2" if nvidia_driver_present() else "3"


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
