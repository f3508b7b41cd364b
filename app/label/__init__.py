"""The Label tab. Rules: the queue and k answers (service.py; single.py records verdicts on one
answer, ranking.py orders of 3-4). The page: one screen for every mode (modes.py, screen.py,
handlers.py, record.py, texts.py, wired in tab.py), the named endpoints (api.py) and the plain
`POST /api/vote` route (route.py)."""
