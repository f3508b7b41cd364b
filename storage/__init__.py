"""DPO Studio's preference store: SQLAlchemy models, sessions, repository functions, import/export.

Knows nothing of torch or the UI.
"""
