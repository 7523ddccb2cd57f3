"""``python -m ldct_tf.node --ae-title LDCT --port 11112 --model saved_models/ldct_denoiser [--server URL]
[--forward AET@HOST:PORT] [--store DIR] [--spool DIR]``: run the DICOM node until SIGTERM / Ctrl-C.

Start-up order matters: the spool is opened and recovered and the model is loaded *before* the port opens, so a
sender never gets an acknowledgement from a node that cannot denoise, and bad settings fail in one line before
anything listens.  SIGTERM stops accepting associations, lets the worker finish the step it is in (up to
``--shutdown-timeout`` s; anything unfinished stays in the spool for the next start) and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from ldct_tf import denoise
from ldct_tf.node.forward import parse_destination
from ldct_tf.node.scp import StorageHandlers, build_ae
from ldct_tf.node.spool import Spool, SpoolError
from ldct_tf.node.tracker import SeriesTracker
from ldct_tf.node.worker import SeriesWorker, WorkerOptions

log = logging.getLogger("ldct_tf.node")

DEFAULT_SPOOL = "ldct_node_spool"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ldct_tf.node",
        description="DICOM node: receives CT series by C-STORE, denoises each complete series, and forwards the "
                    "derived series by C-STORE and/or stores it in a folder.")
    p.add_argument("--ae-title", default="LDCT", help="the node's AE title (default %(default)s)")
    p.add_argument("--port", type=int, default=11112, help="port to listen on (default %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all: %(default)s)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help=f"SavedModel folder (default {denoise.DEFAULT_MODEL})")
    source.add_argument("--server", help="TF Serving URL instead: http://host:8501 or grpc://host:8500")
    p.add_argument("--server-model", default=denoise.DEFAULT_SERVER_MODEL, help="model name on the server")
    p.add_argument("--server-version", type=int, help="model version on the server (default: its newest)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per TF Serving request (default 60)")
    p.add_argument("--strength", type=float, help="denoising strength in [0, 1] (default: the model's; see "
                                                  "python -m ldct_tf.denoise --help)")
    p.add_argument("--batch-size", type=int, default=denoise.DEFAULT_BATCH_SIZE, help="slices per model call")
    p.add_argument("--forward", metavar="AET@HOST:PORT", help="C-STORE each derived series here (e.g. your PACS)")
    p.add_argument("--store", metavar="DIR", help="also write each derived series to DIR/<batch>/")
    p.add_argument("--spool", metavar="DIR", default=DEFAULT_SPOOL,
                   help="where received instances wait, survive restarts, and failed series are kept "
                        "(default ./%(default)s)")
    p.add_argument("--quiet-time", type=float, default=10.0,
                   help="a series is complete when its associations have ended and nothing new arrived for this "
                        "many seconds (default %(default)s)")
    p.add_argument("--retries", type=int, default=5, help="attempts per series before it is kept as failed "
                                                          "(default %(default)s)")
    p.add_argument("--retry-delay", type=float, default=30.0,
                   help="seconds before the first retry, doubled after each (default %(default)s)")
    p.add_argument("--retry-failed", action="store_true", help="on start, try the series in SPOOL/failed again")
    p.add_argument("--allow-aet", action="append", metavar="AET",
                   help="accept associations only from this calling AE title (repeat for several)")
    p.add_argument("--max-associations", type=int, default=10, help="simultaneous associations (default 10)")
    p.add_argument("--keep-done", action="store_true", help="keep delivered series in SPOOL/done instead of "
                                                            "deleting them")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let a running step finish (default %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


class NodeError(Exception):
    """A setting that makes the node unusable; reported as one line, exit status 1."""


def _check(args: argparse.Namespace) -> None:
    if not args.forward and not args.store:
        raise NodeError("nothing would receive the denoised series: pass --forward AET@HOST:PORT and/or --store DIR")
    if not 0 < args.port < 65536:
        raise NodeError(f"--port {args.port}: not a port number")
    if not args.ae_title.strip() or len(args.ae_title) > 16:
        raise NodeError(f"--ae-title {args.ae_title!r}: an AE title has 1 to 16 characters")
    for name, value, low in (("--quiet-time", args.quiet_time, 0), ("--retry-delay", args.retry_delay, 0),
                             ("--retries", args.retries, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-associations", args.max_associations, 1)):
        if value < low:
            raise NodeError(f"{name} {value}: must be at least {low}")
    if args.store and Path(args.store).exists() and not Path(args.store).is_dir():
        raise NodeError(f"--store {args.store}: exists and is not a folder")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # pynetdicom's INFO/DEBUG output dumps request details (UIDs); its warnings and errors do not.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    spool = Spool(args.spool)
    try:
        _check(args)
        forward = parse_destination(args.forward) if args.forward else None
        store = Path(args.store) if args.store else None
        spool.open()
        if args.server:
            denoiser, model = denoise.connect_server(args.server, args.server_model, args.server_version,
                                                     args.timeout, args.batch_size, args.strength)
        else:
            denoiser, model = denoise.load_saved_model(args.model or denoise.DEFAULT_MODEL, args.batch_size,
                                                       args.strength)
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
    except (NodeError, SpoolError, denoise.DenoiseError, ValueError, OSError) as exc:
        print(f"ldct_tf.node: error: {exc}", file=sys.stderr)
        spool.close()
        return 1

    tracker = SeriesTracker(spool, args.quiet_time)
    options = WorkerOptions(ae_title=args.ae_title, forward=forward, store=store, batch_size=args.batch_size,
                            max_attempts=args.retries, retry_delay_s=args.retry_delay, keep_done=args.keep_done,
                            forward_timeout_s=args.timeout)
    worker = SeriesWorker(spool, tracker, denoiser, model, options)
    requeued = spool.requeue_failed() if args.retry_failed else []
    series, batches = spool.recover()
    for key in series:
        tracker.add_recovered(key)
    for batch in batches:
        worker.schedule(batch)
    if series or batches:
        log.info("spool %s: %d series still arriving and %d batch(es) to process from before the start%s",
                 spool.root, len(series), len(batches), f" ({len(requeued)} from failed/)" if requeued else "")

    ae = build_ae(args.ae_title, args.allow_aet, max_associations=args.max_associations)
    handlers = StorageHandlers(spool, tracker)
    try:
        server = ae.start_server((args.host, args.port), block=False, evt_handlers=handlers.handlers())
    except OSError as exc:
        print(f"ldct_tf.node: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        spool.close()
        return 1

    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.start()
    log.info("listening as %s on %s:%d; model %s v%s via %s; forward %s; store %s; spool %s", args.ae_title,
             args.host, args.port, model.name, model.version, model.where, forward or "-", store or "-", spool.root)
    while not stop.wait(1.0):
        pass
    for assoc in server.active_associations:  # an instance not yet acknowledged is the sender's to resend
        assoc.abort()
    server.shutdown()
    worker.stop()
    worker.join(args.shutdown_timeout)
    if worker.is_alive():
        log.warning("a series step is still running after %.0f s; it stays in the spool for the next start",
                    args.shutdown_timeout)
    spool.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
