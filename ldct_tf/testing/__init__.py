"""Test helpers that the tests share (not used by the library itself): a loopback TF
Serving stand-in (:mod:`~ldct_tf.testing.model_server`) and small exportable models (:mod:`~ldct_tf.testing.models`).
"""
