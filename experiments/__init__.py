"""Runs that produce shipped artefacts (model v2's recipe and blend, the audit thresholds); their arms are YAML files
under ``configs/experiments/`` and the rules that choose live in the library (``ldct_tf.evaluate.selection``,
``ldct_tf.audit.calibration``).  See ``experiments/README.md``."""
