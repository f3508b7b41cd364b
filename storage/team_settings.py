"""Team-wide settings an admin changes at run time (the overlap, the queue order, the model's
own labels), one `Setting` row each, read afresh by every app replica. The owners of the
settings check their values; this module only reads and writes the rows."""

from __future__ import annotations

from sqlalchemy.orm import Session

from storage.models import Setting, now_utc

# What a setting holds: the JSON column's values the settings use.
SettingValue = int | float | str | bool


def read_setting(session: Session, key: str) -> SettingValue | None:
    """The stored value of `key`, None when no admin set it."""
    setting = session.get(Setting, key)
    return setting.value if setting is not None else None


def write_setting(session: Session, key: str, value: SettingValue) -> None:
    """Store `value` for `key` (the caller checked it), stamped now."""
    setting = session.get(Setting, key) or Setting(key=key)
    setting.value, setting.updated_at = value, now_utc()
    session.add(setting)
