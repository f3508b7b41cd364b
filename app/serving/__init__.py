"""Serving the one model in memory: its versions (versions.py) and the line every request
joins to use it (service.py)."""
