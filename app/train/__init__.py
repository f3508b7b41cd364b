"""The Train tab: training runs (service.py, a facade over request.py, preflight.py,
supervisor.py, activation.py, status.py and round_text.py), the page (tab.py), the version
list (version_panel.py), the worker process (worker.py) and the pairs a run reads (pairs.py)."""
