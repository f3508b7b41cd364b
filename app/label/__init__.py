"""The Label tab: the queue, answer pairs and votes (service.py), the page (tab.py) and the
plain `POST /api/vote` route (route.py)."""
