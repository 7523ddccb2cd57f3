"""The one base class of the errors ldct_tf raises on purpose.

Why a common base: an expected failure (a file that is not CT, a config key out of range, a folder that cannot be
written) must reach the user as one line naming the file and the reason, while a bug must keep its traceback.  With
every project error deriving from :class:`LdctError`, each command maps exactly these to ``prog: error: msg`` and exit
code 1 in one place (:func:`ldct_tf.cli.run_main`), and a Python caller catches all of them with one ``except``.
Stage errors keep a builtin base where callers rely on it (``class ConfigError(LdctError, ValueError)``).
"""

from __future__ import annotations


class LdctError(Exception):
    """An expected failure of ldct_tf (bad input, unusable config or folder); its message is one line for a user."""
