"""The Compare tab: side by side, blind votes and batch before/after (service.py), their
statistics (stats.py) and the page (tab.py)."""
