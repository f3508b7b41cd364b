"""The Data tab: counts, import and export (service.py) and the page (tab.py)."""
