"""``python -m ldct_tf.node``: see :mod:`ldct_tf.node.cli`."""

import sys

from ldct_tf.node.cli import main

if __name__ == "__main__":
    sys.exit(main())
