"""``python -m ldct_tf.node``: a DICOM node that denoises the low-dose CT series a scanner or PACS sends to it.

Scanners and PACS move images with DICOM networking, not files, so this is the way a hospital can use the denoiser:
register the node as a storage destination (AE title, host, port), send it a series, and the denoised *derived*
series comes back to a viewer's PACS (``--forward``) and/or lands in a folder (``--store``).

The flow, one module per step::

    scanner/PACS --C-STORE--> scp.py ---- spool.py (on disk, fsync'ed before the C-STORE is acknowledged)
                                |                 |
                   tracker.py: series complete =  |  association released + no new instance for --quiet-time s
                                                  v
                             worker.py: claim -> ldct_tf.denoise (SavedModel or TF Serving) -> store / forward.py
                                        failure: kept with its reason, retried with backoff, then failed/

Everything the node has acknowledged is on disk before the acknowledgement, so a crash or restart loses nothing: on
start the spool is recovered (``Spool.recover``) and every pending series is processed.  Logs name series by a
salted SHA-256 prefix of their UID (a "series key"), never by patient attributes or UIDs.
"""
