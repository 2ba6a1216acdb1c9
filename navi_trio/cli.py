"""The ``navi-trio`` command line (argparse: the standard library does the job)."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import trio

from . import __version__
from .auth import ROLES, hash_token, new_token, valid_user_name
from .chat.client import add_arguments as add_chat_arguments
from .chat.client import main as chat_main
from .errors import StoreError
from .logs import configure_logging
from .settings import Settings
from .store.base import User, utc_now
from .store.sqlite import SqliteStore

if TYPE_CHECKING:
    from .store.postgres import PostgresStore

DATA_DIR_HELP = "where the database lives (NAVI_DATA_DIR, default ./navi-data)"


def _data_dir_option(parser: argparse.ArgumentParser, *, inner: bool = False) -> None:
    """``--data-dir`` on ``parser``. On a subcommand's own parser (``inner``) it does not
    overwrite a value given before the subcommand, so ``users --data-dir D add NAME`` and
    ``users add NAME --data-dir D`` mean the same."""
    parser.add_argument("--data-dir", help=DATA_DIR_HELP, default=argparse.SUPPRESS if inner else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="navi-trio", description="Streaming LLM-agent chat backend on Trio.")
    parser.add_argument("--version", action="version", version=f"navi-trio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the app with hypercorn's trio worker")
    serve.add_argument("--host", help="bind address (NAVI_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port, 0 for any free one (NAVI_PORT, default 8000)")
    _data_dir_option(serve)
    serve.add_argument("--agent", help="agent to run (NAVI_AGENT, default scripted)")
    serve.add_argument("--auth", choices=["optional", "required"], help="auth mode (NAVI_AUTH)")
    serve.add_argument("--store", choices=["sqlite", "memory"], help="store backend (NAVI_STORE, default sqlite)")
    serve.add_argument("--heartbeat-s", type=float, help="heartbeat interval (NAVI_HEARTBEAT_S, default 20)")
    serve.add_argument("--grace-s", type=float, help="shutdown grace for runs (NAVI_GRACE_S, default 10)")
    serve.add_argument("--log-format", choices=["auto", "console", "json"], help="NAVI_LOG_FORMAT")
    serve.add_argument("--log-level", help="NAVI_LOG_LEVEL (default info)")
    serve.add_argument("--access-log", help="hypercorn access log: '-' for stderr or a file (NAVI_ACCESS_LOG)")

    users = sub.add_parser("users", help="manage users and their tokens")
    _data_dir_option(users)
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="add a user and print their token (shown once)")
    add.add_argument("name")
    add.add_argument("--role", choices=list(ROLES), default="user")
    list_ = users_sub.add_parser("list", help="list users (never tokens)")
    revoke = users_sub.add_parser("revoke", help="revoke a user: their tokens stop working, connections close")
    revoke.add_argument("name")
    for users_parser in (add, list_, revoke):
        _data_dir_option(users_parser, inner=True)

    add_chat_arguments(sub.add_parser("chat", help="chat with a server from the terminal"))
    return parser


async def _users(args: argparse.Namespace, settings: Settings) -> int:
    """``navi-trio users ...`` against the server's database: PostgreSQL if
    ``NAVI_DATABASE_URL`` is set, else the SQLite database of ``settings.data_dir``.

    A running server sees the change at once: it reads tokens from the database on every
    request, and closes a revoked user's connections within a second.
    """
    # Which database: a token made in another directory than the server's would never work.
    store: SqliteStore | PostgresStore
    if settings.database_url:
        from .store.postgres import PostgresStore, describe

        print(f"navi-trio: database {describe(settings.database_url)}", file=sys.stderr)
        store = await PostgresStore.open(settings.database_url)
    else:
        print(f"navi-trio: data dir {settings.data_dir.resolve()}", file=sys.stderr)
        store = await SqliteStore.open(settings.data_dir / "navi.sqlite3")
    async with store:
        if args.users_command == "add":
            if not valid_user_name(args.name):
                print(
                    "navi-trio: a user name is 1-64 letters, digits or _.@- and starts with a letter or digit",
                    file=sys.stderr,
                )
                return 2
            token = new_token()
            user = User(uuid.uuid4().hex, args.name, args.role, utc_now())
            try:
                await store.add_user(user, hash_token(token))
            except StoreError as exc:
                print(f"navi-trio: {exc}", file=sys.stderr)
                return 1
            print(f"added {user.role} {user.name} (id {user.id}); their token, shown only this once:")
            print(token)
        elif args.users_command == "list":
            for user in await store.list_users():
                state = "revoked" if user.revoked else "active"
                print(f"{user.name}\t{user.role}\t{state}\t{user.created_at}\t{user.id}")
        elif args.users_command == "revoke":
            revoked = await store.revoke_user(args.name, utc_now())
            if revoked is None:
                print(f"navi-trio: no user named {args.name!r}", file=sys.stderr)
                return 1
            print(f"revoked {revoked.name}: their tokens no longer work")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "chat":
        return chat_main(args)
    if args.command == "users":
        try:
            settings = Settings.from_env(data_dir=args.data_dir)
        except ValueError as exc:
            print(f"navi-trio: {exc}", file=sys.stderr)
            return 2
        try:
            return trio.run(_users, args, settings)
        except StoreError as exc:
            print(f"navi-trio: {exc}", file=sys.stderr)
            return 1
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
                access_log=args.access_log,
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
