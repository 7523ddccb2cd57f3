"""ldct_tf: unpaired low-dose CT denoising with TensorFlow (see README.md and ARCHITECTURE.md)."""

from ldct_tf.quiet_logs import quiet_tensorflow as _quiet_tensorflow

_quiet_tensorflow()  # before any submodule imports TensorFlow: no spurious cuInit error on CPU machines
