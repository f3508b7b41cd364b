"""`python -m app users add|list|remove`: manage the users file for sign-in."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from app.auth.users import MIN_PASSWORD_LENGTH, ROLES, AuthFileError, UserStore


def default_auth_file() -> Path:
    """`DPO_STUDIO_AUTH_FILE`, else ./users.toml."""
    return Path(os.environ.get("DPO_STUDIO_AUTH_FILE", "users.toml"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app users", description=__doc__)
    p.add_argument(
        "--auth-file",
        type=Path,
        default=None,
        help="users file (default $DPO_STUDIO_AUTH_FILE or ./users.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a user (asks for the password twice)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="annotator")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin (for scripts)",
    )
    add.add_argument("--replace", action="store_true", help="change an existing user")
    sub.add_parser("list", help="list users and roles")
    rm = sub.add_parser("remove", help="remove a user (their sessions end at once)")
    rm.add_argument("name")
    return p


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"Password (at least {MIN_PASSWORD_LENGTH} characters): ")
    if getpass.getpass("Repeat password: ") != first:
        raise ValueError("the two passwords differ")
    return first


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.auth_file or default_auth_file()
    try:
        store = UserStore(path)
        if args.command == "add":
            user = store.add(
                args.name, args.role, _read_password(args.password_stdin), replace=args.replace
            )
            print(f"{user.name}: {user.role} (saved in {path})")
        elif args.command == "list":
            users = store.users()
            if not users:
                print(f"no users in {path}")
            for user in sorted(users.values(), key=lambda u: u.name):
                print(f"{user.name}\t{user.role}")
        elif args.command == "remove":
            store.remove(args.name)
            print(f"removed {args.name} from {path}")
    except (AuthFileError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, EOFError):
        print("\ncancelled", file=sys.stderr)
        return 130
    return 0
