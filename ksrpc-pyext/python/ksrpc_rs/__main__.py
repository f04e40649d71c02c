"""``python -m ksrpc_rs``: the ``ksrpc-server`` command line, served by this interpreter.

Same flags and environment as the binary: ``--config`` (or ``KSRPC_CONFIG``), ``--host``,
``--port``, ``--path``, ``KSRPC_SECTION__KEY`` variables, and ``hash-password`` (reads the
password from stdin). Prints ``ksrpc-server listening on URL`` once serving; Ctrl-C or SIGTERM
stops it gracefully.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from . import hash_password, serve


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ksrpc_rs",
                                description="The ksrpc server, running inside this Python.")
    p.add_argument("--config", default=os.environ.get("KSRPC_CONFIG") or None,
                   help="TOML config file (also KSRPC_CONFIG)")
    p.add_argument("--host", help="address to bind (overrides server.host)")
    p.add_argument("--port", type=int, help="port to bind (overrides server.port; 0 picks a free port)")
    p.add_argument("--path", help="URL prefix (overrides server.path)")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("hash-password", help="print an argon2id hash of a password read from stdin")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-password":
        if sys.stdin.isatty():
            print("password (input is visible; pipe it in to avoid that): ", end="", file=sys.stderr, flush=True)
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            print("error: empty password", file=sys.stderr)
            return 1
        print(hash_password(password))
        return 0
    # This command is the host program, so it owns the signals: SIGINT and SIGTERM stop
    # the server gracefully, as the binary's do, through a KeyboardInterrupt (also when
    # started with SIGINT ignored, as background jobs are). The handlers are in place
    # before the server starts, and everything after the start is inside the `try`, so a
    # signal that lands between "listening" and the wait still stops it cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    srv = None
    try:
        srv = serve(args.config, host=args.host, port=args.port, path=args.path)
        for url in srv.urls:
            print(f"ksrpc-server listening on {url}", flush=True)
        srv.wait()
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if srv is not None:
            srv.stop()  # idempotent: wait() may have stopped it already
        print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
