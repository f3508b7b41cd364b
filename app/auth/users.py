"""Users, hashed passwords and roles for team deployments (`python -m app --auth-file users.toml`).

The users file is TOML and never holds a password, only an scrypt hash with its own salt and
cost parameters:

    [users."alice"]
    role = "admin"
    password = "scrypt$32768$8$1$<salt, base64>$<hash, base64>"

Roles: `admin` may do everything; `annotator` may label and compare. Handlers that only an
admin may run (import, export, train, switch versions) call `require_role(request, "admin")`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("admin", "annotator")
ADMIN, ANNOTATOR = ROLES
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MIN_PASSWORD_LENGTH = 8

# scrypt cost: N=2^15, r=8, p=1 takes 32 MiB and ~0.25 s on one core here. Parameters are
# stored in every hash, so raising them later keeps old hashes verifiable.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAX_MEMORY = 256 * 2**20
SALT_BYTES, HASH_BYTES = 16, 32
# Verifying against this when the user does not exist keeps the timing the same either way.
_DUMMY_HASH = (
    "scrypt$32768$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)


class AuthFileError(ValueError):
    """The users file is missing, unreadable or malformed; the message says how to fix it."""


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * n * r * p > SCRYPT_MAX_MEMORY:
        raise ValueError(f"unsupported scrypt parameters n={n} r={r} p={p}")
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        dklen=HASH_BYTES,
        maxmem=SCRYPT_MAX_MEMORY + 2**20,
    )


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """`scrypt$n$r$p$salt$hash` with a fresh random salt (base64 fields)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, n, r, p)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Recompute the hash with the stored salt and parameters; compare in constant time."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
    except ValueError:  # malformed field (binascii.Error is a ValueError)
        return False
    return hmac.compare_digest(actual, expected)


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid user name {name!r}: use 1-64 letters, digits or . _ @ - "
            "(starting with a letter or digit)"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    return role


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str


def parse_users(text: str, source: str = "users file") -> dict[str, User]:
    """Parse the TOML users file; every error names the offending entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise AuthFileError(f"{source} is not valid TOML: {err}") from err
    table = data.get("users", {})
    if not isinstance(table, dict):
        raise AuthFileError(f"{source}: [users] must be a table of users")
    users: dict[str, User] = {}
    for name, entry in table.items():
        try:
            check_name(name)
            if not isinstance(entry, dict):
                raise ValueError("each user must be a table with role and password")
            role = check_role(str(entry.get("role", "")))
            password_hash = entry.get("password", "")
            if not isinstance(password_hash, str) or not password_hash.startswith("scrypt$"):
                raise ValueError(
                    "password must be an scrypt hash; set it with "
                    f"`python -m app users add {name} --role {role}`"
                )
        except ValueError as err:
            raise AuthFileError(f"{source}, user {name!r}: {err}") from err
        users[name] = User(name, role, password_hash)
    return users


def format_users(users: dict[str, User]) -> str:
    lines = [
        "# DPO Studio users. Manage with `python -m app users add|list|remove`.",
        "# Passwords are scrypt hashes (never plain text); roles: admin, annotator.",
    ]
    for user in sorted(users.values(), key=lambda u: u.name):
        # Names match NAME_PATTERN, so quoting needs no escapes.
        lines += ["", f'[users."{user.name}"]', f'role = "{user.role}"']
        lines.append(f'password = "{user.password_hash}"')
    return "\n".join(lines) + "\n"


class UserStore:
    """The users file, re-read whenever it changes on disk (so `users remove` takes effect
    on the running app without a restart)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._users: dict[str, User] = {}
        self._stamp: tuple[int, int] | None = None
        self.reload()

    def _read_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload(self) -> None:
        stamp = self._read_stamp()
        if stamp is None:
            self._users, self._stamp = {}, None
            return
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise AuthFileError(f"cannot read users file {self.path}: {err}") from err
        self._users, self._stamp = parse_users(text, str(self.path)), stamp

    def users(self) -> dict[str, User]:
        """Current users; a file that became unreadable keeps the last good copy."""
        if self._read_stamp() != self._stamp:
            with contextlib.suppress(AuthFileError):
                self.reload()
        return dict(self._users)

    def get(self, name: str) -> User | None:
        return self.users().get(name)

    def check(self, name: str, password: str) -> User | None:
        """The user when the password matches, else None (same cost for unknown names)."""
        user = self.get(name)
        ok = verify_password(password, user.password_hash if user else _DUMMY_HASH)
        return user if ok and user else None

    def add(self, name: str, role: str, password: str, *, replace: bool = False) -> User:
        check_name(name)
        check_role(role)
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ValueError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
        users = self.users()
        if name in users and not replace:
            raise ValueError(f"user {name!r} exists; pass --replace to change role or password")
        users[name] = User(name, role, hash_password(password))
        self._write(users)
        return users[name]

    def remove(self, name: str) -> None:
        users = self.users()
        if name not in users:
            raise ValueError(f"no user {name!r} in {self.path}")
        del users[name]
        self._write(users)

    def _write(self, users: dict[str, User]) -> None:
        """Write atomically with mode 0600 (hashes are secrets too)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".users-", suffix=".toml", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(format_users(users))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.reload()


# ---- role checks inside Gradio handlers --------------------------------------------------

ROLE_STATE_KEY = "dpo_studio_role"
USER_STATE_KEY = "dpo_studio_user"  # the signed-in user's name, for routes outside Gradio


def request_role(request: Any) -> str | None:
    """The role the auth gate attached to this request, or None when auth is off.

    With auth off (a single local user) every request acts as admin. With auth on, the gate
    sets a username and a role on every request it lets through; a username without a role
    is refused (fail closed).
    """
    if request is None or getattr(request, "username", None) is None:
        return ADMIN
    try:
        return getattr(request.state, ROLE_STATE_KEY, None)
    except AttributeError:
        return None


def require_role(request: Any, role: str, action: str = "do this") -> str:
    """Raise a `gr.Error` with a clear message unless the signed-in user has `role`.

    Returns the user name (or "local" with auth off). Use in admin-only handlers:
    `require_role(request, "admin", "start training")`.
    """
    import gradio as gr

    check_role(role)
    have = request_role(request)
    name = getattr(request, "username", None) or "local"
    if have in (ADMIN, role):
        return name
    raise gr.Error(
        f"Only an {role} can {action}; you are signed in as {name!r} "
        f"({have or 'no role'}). Ask an admin.",
        title="Not allowed",
    )


def annotator_name(request: Any, fallback: str = "") -> str:
    """Who is voting: the signed-in user with auth on, else the free-text `fallback`."""
    username = getattr(request, "username", None) if request is not None else None
    return annotator_for(username, fallback)


def annotator_for(username: str | None, fallback: str = "") -> str:
    """`annotator_name` from the signed-in user name itself (routes outside Gradio)."""
    return username or fallback.strip() or "anonymous"
