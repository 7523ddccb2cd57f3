"""``python -m ldct_tf.testing``: run the loopback TF Serving stand-in by hand, to try the client, ``curl`` or the
node against exported models where the real ``tensorflow_model_server`` cannot be installed.

It listens where TF Serving does, gRPC on 8500 and REST on 8501 (127.0.0.1 only), and takes TF Serving's own flag
names (``--port``, ``--rest_api_port``, ``--model_name``, ``--model_config_file``), so the README's commands and
URLs work unchanged against it.  TensorFlow is imported only after the arguments are read, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

# Kept equal to model_server.DEFAULT_GRPC_PORT / DEFAULT_REST_PORT (a test checks); not imported from there because
# that module imports TensorFlow, which --help should not wait for.
GRPC_PORT, REST_PORT = 8500, 8501


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ldct_tf.testing",
        description="Serve exported SavedModels on 127.0.0.1 the way TF Serving does (REST and gRPC), for trying the "
                    "serving client by hand. Versions follow the model's version policy in MODELS_ROOT/models.config "
                    "(default: the latest version only).")
    parser.add_argument("models_root", nargs="?", default="saved_models", type=Path,
                        help="folder holding NAME/VERSION/saved_model.pb (default: saved_models)")
    parser.add_argument("--model_name", "--model-name", dest="name", default="ldct_denoiser",
                        help="model to serve (default: ldct_denoiser)")
    parser.add_argument("--port", "--grpc-port", dest="grpc_port", type=int, default=GRPC_PORT,
                        help=f"gRPC port (default: {GRPC_PORT}, as TF Serving; 0 picks a free one)")
    parser.add_argument("--rest_api_port", "--rest-port", dest="rest_port", type=int, default=REST_PORT,
                        help=f"REST port (default: {REST_PORT}, as TF Serving; 0 picks a free one)")
    parser.add_argument("--model_config_file", "--model-config-file", dest="config", type=Path, default=None,
                        help="TF Serving model config whose model_version_policy applies "
                             "(default: MODELS_ROOT/models.config when present)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for port in (args.grpc_port, args.rest_port):
        if not 0 <= port <= 65535:
            print(f"ldct_tf.testing: error: port {port} is not between 0 and 65535", file=sys.stderr)
            return 2
    if args.config is not None and not args.config.is_file():
        print(f"ldct_tf.testing: error: {args.config}: no such model config file", file=sys.stderr)
        return 2
    from ldct_tf.testing.model_server import serve

    try:
        with serve(args.models_root, args.name, args.rest_port, args.grpc_port, args.config) as (rest, target):
            served = ", ".join(str(v) for v in sorted(serve.last.models))
            print(f"serving {args.name} version(s) {served}: REST {rest}  gRPC {target}  (Ctrl-C stops)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    except (OSError, ValueError) as exc:  # no model, a bad config, a port in use: one line, no traceback
        print(f"ldct_tf.testing: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
