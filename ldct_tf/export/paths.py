"""Where ``python -m ldct_tf.export`` writes, and when it refuses to.

Why a rule: ``saved_models/`` in the checkout holds the shipped model, the one ``denoise``, the demo and the node load
when no ``--model`` is given.  Exporting there adds a version that TF Serving and :func:`~ldct_tf.saved_model
.resolve_version_dir` treat as the newest, so a four-minute experiment would silently replace the shipped model (and
rewrite ``saved_models/models.config``).  So the default is a folder inside the training run (which training made),
an explicit ``--output`` is the user's choice, and the shipped folder is written only with ``--replace-default-model``.
Kept apart from :mod:`ldct_tf.export` so the rule loads without TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ldct_tf.errors import LdctError

REPO = Path(__file__).resolve().parents[2]  # ldct_tf/export/this file -> the checkout
SHIPPED_ROOT = REPO / "saved_models"
EXPORT_SUBFOLDER = "export"


class ExportTargetError(LdctError, ValueError):
    """An ``--output`` that would replace the shipped model without the flag that says so."""


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def output_folder(model_dir: str | Path, name: str, output: Optional[str | Path] = None,
                  replace_default_model: bool = False, shipped_root: Path = SHIPPED_ROOT) -> Path:
    """The model folder to write versions into: ``shipped_root/name`` with ``replace_default_model``, else
    ``output``, else ``model_dir/export/name``.  Raises :class:`ExportTargetError` for an ``output`` inside
    ``shipped_root`` without ``replace_default_model``."""
    if replace_default_model:
        if output is not None and not _inside(Path(output), shipped_root):
            raise ExportTargetError(f"{output}: --replace-default-model writes into {shipped_root}; drop --output")
        return Path(output) if output is not None else shipped_root / name
    if output is None:
        return Path(model_dir) / EXPORT_SUBFOLDER / name
    if _inside(Path(output), shipped_root):
        raise ExportTargetError(
            f"{output}: is inside the shipped {shipped_root}, whose newest version denoise, the demo and the node "
            "load by default; add --replace-default-model to publish there, or choose another --output")
    return Path(output)
