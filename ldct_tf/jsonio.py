"""Strict JSON for what ldct_tf writes (``audit.json``, ``summary.json``, benchmark results).

Why a shared module: the audit and the evaluation both write reports holding numpy scalars and NaN (a metric with no
value); ``json.dumps`` writes ``NaN``, which strict parsers (browsers, ``jq``) refuse.  One converter keeps every
report readable and keeps the audit from importing the evaluation stage for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """Non-finite floats -> None, numpy scalars -> Python, recursively (strict JSON for summary.json and callers
    that store the summary, such as the quality benchmark)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
