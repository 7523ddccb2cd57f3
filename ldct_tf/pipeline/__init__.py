"""The Apache Beam DICOM -> TFRecord pipeline (``python -m ldct_tf.pipeline``)."""

from ldct_tf.quiet_logs import import_beam_quietly as _import_beam_quietly

_import_beam_quietly()  # without Beam's "apitools not found" warning on every run (apache/beam#18230)
