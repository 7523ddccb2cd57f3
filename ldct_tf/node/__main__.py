"""``python -m ldct_tf.node --ae-title LDCT --port 11112 --model saved_models/ldct_denoiser [--server URL]
[--forward AET@HOST:PORT] [--store DIR] [--spool DIR] [--host ADDR --allow-aet AET] [--tls-cert F --tls-key F]``:
run the DICOM node until SIGTERM / Ctrl-C.

Start-up order matters: the spool is opened and recovered and the model is loaded *before* the port opens, so a
sender never gets an acknowledgement from a node that cannot denoise, and bad settings fail in one line before
anything listens.  Secure by default: it listens on 127.0.0.1 unless ``--host`` is given, and beyond loopback only
with a calling-AE allow-list (see :mod:`ldct_tf.node.security`).  SIGTERM stops accepting associations, lets the
worker finish the step it is in (up to ``--shutdown-timeout`` s; anything unfinished stays in the spool for the next
start) and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ldct_tf import denoise
from ldct_tf.node.forward import Destination, parse_destination
from ldct_tf.node.scp import DEFAULT_MAX_SLICE_SIZE, StorageHandlers, Timeouts, build_ae
from ldct_tf.node.security import (AccessRules, client_tls_context, exposure_problem, parse_networks,
                                   server_tls_context)
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
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; any other needs --allow-aet)")
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
    _add_security(p)
    p.add_argument("--max-associations", type=int, default=10, help="simultaneous associations (default 10)")
    p.add_argument("--max-slice-size", type=int, default=DEFAULT_MAX_SLICE_SIZE,
                   help="refuse slices with more rows or columns than this (default %(default)s)")
    defaults = Timeouts()
    p.add_argument("--acse-timeout", type=float, default=defaults.acse,
                   help="seconds a new connection has to request an association (default %(default)s)")
    p.add_argument("--dimse-timeout", type=float, default=defaults.dimse,
                   help="seconds to wait for the rest of a DIMSE message (default %(default)s)")
    p.add_argument("--network-timeout", type=float, default=defaults.network,
                   help="seconds an association may stay silent before it is aborted (default %(default)s)")
    p.add_argument("--keep-done", action="store_true", help="keep delivered series in SPOOL/done instead of "
                                                            "deleting them")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let a running step finish (default %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _add_security(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-aet", action="append", metavar="AET",
                   help="accept associations only from this calling AE title (repeat for several; required with a "
                        "--host beyond loopback)")
    p.add_argument("--allow-host", action="append", metavar="ADDR",
                   help="accept associations only from this address or network, e.g. 10.0.0.0/24 (repeatable)")
    p.add_argument("--tls-cert", metavar="PEM", help="listen with TLS: the node's certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="PEM", help="require client certificates signed by these CA(s)")
    p.add_argument("--forward-tls-ca", metavar="PEM",
                   help="forward over TLS; the destination's certificate must be signed by these CA(s)")
    p.add_argument("--forward-tls-cert", metavar="PEM", help="the node's client certificate for the destination")
    p.add_argument("--forward-tls-key", metavar="PEM", help="the private key of --forward-tls-cert")


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
                             ("--max-associations", args.max_associations, 1),
                             ("--max-slice-size", args.max_slice_size, 1), ("--acse-timeout", args.acse_timeout, 0.1),
                             ("--dimse-timeout", args.dimse_timeout, 0.1),
                             ("--network-timeout", args.network_timeout, 0.1)):
        if value < low:
            raise NodeError(f"{name} {value}: must be at least {low}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise NodeError("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        raise NodeError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    if (args.forward_tls_cert or args.forward_tls_key) and not args.forward_tls_ca:
        raise NodeError("--forward-tls-cert/--forward-tls-key need --forward-tls-ca")
    if args.forward_tls_ca and not args.forward:
        raise NodeError("--forward-tls-ca without --forward")
    if args.store and Path(args.store).exists() and not Path(args.store).is_dir():
        raise NodeError(f"--store {args.store}: exists and is not a folder")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # pynetdicom's INFO/DEBUG output dumps request details (UIDs); its warnings and errors do not.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)


@dataclass(frozen=True)
class _Settings:
    """What the arguments resolve to before anything is opened (each step here can refuse in one line)."""

    forward: Optional[Destination]
    store: Optional[Path]
    rules: AccessRules
    server_tls: Optional[ssl.SSLContext]
    forward_tls: Optional[ssl.SSLContext]


def _settings(args: argparse.Namespace) -> _Settings:
    _check(args)
    rules = AccessRules(tuple(a.strip() for a in args.allow_aet or ()), tuple(parse_networks(args.allow_host or ())))
    problem = exposure_problem(args.host, rules)
    if problem:
        raise NodeError(problem)
    return _Settings(
        forward=parse_destination(args.forward) if args.forward else None,
        store=Path(args.store) if args.store else None, rules=rules,
        server_tls=server_tls_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None,
        forward_tls=(client_tls_context(args.forward_tls_ca, args.forward_tls_cert, args.forward_tls_key)
                     if args.forward_tls_ca else None))


def _load_model(args: argparse.Namespace) -> tuple[denoise.Denoiser, denoise.ModelInfo]:
    if args.server:
        return denoise.connect_server(args.server, args.server_model, args.server_version, args.timeout,
                                      args.batch_size, args.strength)
    return denoise.load_saved_model(args.model or denoise.DEFAULT_MODEL, args.batch_size, args.strength)


def _recovered_worker(args: argparse.Namespace, spool: Spool, settings: _Settings, denoiser: denoise.Denoiser,
                      model: denoise.ModelInfo) -> tuple[SeriesTracker, SeriesWorker]:
    """The tracker and worker, with whatever the spool held from before the start scheduled again."""
    tracker = SeriesTracker(spool, args.quiet_time)
    options = WorkerOptions(ae_title=args.ae_title, forward=settings.forward, store=settings.store,
                            batch_size=args.batch_size, max_attempts=args.retries, retry_delay_s=args.retry_delay,
                            keep_done=args.keep_done, forward_timeout_s=args.timeout,
                            forward_tls=settings.forward_tls)
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
    return tracker, worker


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    spool = Spool(args.spool)
    try:
        settings = _settings(args)
        spool.open()
        denoiser, model = _load_model(args)
        if settings.store is not None:
            settings.store.mkdir(parents=True, exist_ok=True)
    except (NodeError, SpoolError, denoise.DenoiseError, ValueError, OSError) as exc:
        print(f"ldct_tf.node: error: {exc}", file=sys.stderr)
        spool.close()
        return 1

    tracker, worker = _recovered_worker(args, spool, settings, denoiser, model)
    ae = build_ae(args.ae_title, settings.rules.calling_ae_titles,
                  Timeouts(args.acse_timeout, args.dimse_timeout, args.network_timeout), args.max_associations)
    handlers = StorageHandlers(spool, tracker, settings.rules, args.max_slice_size)
    try:
        server = ae.start_server((args.host, args.port), block=False, evt_handlers=handlers.handlers(),
                                 ssl_context=settings.server_tls)
    except OSError as exc:
        print(f"ldct_tf.node: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        spool.close()
        return 1
    worker.start()
    log.info("listening as %s on %s:%d (%s; calling AE titles: %s); model %s v%s via %s; forward %s%s; store %s; "
             "spool %s", args.ae_title, args.host, args.port, "TLS" if settings.server_tls else "no TLS",
             ", ".join(settings.rules.calling_ae_titles) or "any", model.name, model.version, model.where,
             settings.forward or "-", " (TLS)" if settings.forward_tls else "", settings.store or "-", spool.root)
    _wait_for_signal()
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


def _wait_for_signal() -> None:
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass


if __name__ == "__main__":
    sys.exit(main())
