"""The Train tab: training runs (service.py), the page (tab.py), the version list
(version_panel.py), the worker process (worker.py) and the pairs a run reads (pairs.py)."""
