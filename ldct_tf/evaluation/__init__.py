"""The evaluation of denoisers on paired low/normal-dose CT, one job a module.

``pairs`` (loading paired slices), ``denoisers`` (spec -> function), ``scoring`` (pure: pairs x denoisers ->
summary), ``report`` (CSV/JSON/markdown and figures), ``reader_study`` (blinded kits and their scores).  The command
line is ``python -m ldct_tf.evaluate``.
"""
