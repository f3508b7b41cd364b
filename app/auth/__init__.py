"""Sign-in for team deployments: the users file (users.py), the gate in front of every route
(web.py) and `python -m app users` (cli.py)."""
