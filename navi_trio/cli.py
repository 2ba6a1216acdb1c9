"""The ``navi-trio`` command line (argparse: the standard library does the job)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial

import trio

from .logs import configure_logging
from .settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="navi-trio", description="Streaming LLM-agent chat backend on Trio.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the app with hypercorn's trio worker")
    serve.add_argument("--host", help="bind address (NAVI_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port, 0 for any free one (NAVI_PORT, default 8000)")
    serve.add_argument("--data-dir", help="where the database lives (NAVI_DATA_DIR, default ./navi-data)")
    serve.add_argument("--agent", help="agent to run (NAVI_AGENT, default scripted)")
    serve.add_argument("--auth", choices=["optional", "required"], help="auth mode (NAVI_AUTH)")
    serve.add_argument("--store", choices=["sqlite", "memory"], help="store backend (NAVI_STORE, default sqlite)")
    serve.add_argument("--heartbeat-s", type=float, help="heartbeat interval (NAVI_HEARTBEAT_S, default 20)")
    serve.add_argument("--grace-s", type=float, help="shutdown grace for runs (NAVI_GRACE_S, default 10)")
    serve.add_argument("--log-format", choices=["auto", "console", "json"], help="NAVI_LOG_FORMAT")
    serve.add_argument("--log-level", help="NAVI_LOG_LEVEL (default info)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = Settings.from_env(
                host=args.host,
                port=args.port,
                data_dir=args.data_dir,
                agent=args.agent,
                auth=args.auth,
                store=args.store,
                heartbeat_s=args.heartbeat_s,
                grace_s=args.grace_s,
                log_format=args.log_format,
                log_level=args.log_level,
            )
        except ValueError as exc:
            print(f"navi-trio: {exc}", file=sys.stderr)
            return 2
        configure_logging(settings.log_format, settings.log_level)
        from .server import serve

        trio.run(partial(serve, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
