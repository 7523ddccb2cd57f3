"""Keras Tuner search over the config's tuning section: space, scoring, hypermodel, search (CLI: ldct_tf.tune)."""
