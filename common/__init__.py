"""What app, dpo_core and storage share: plain Python, imports nothing of theirs.

`dpo_core` and `storage` may not import each other, yet both read preference-pair files and
both are command-line tools, so the one rule for each lives here, below all three:
`pair_format` (a pair file's rows -> checked `Pair`s, one error message per problem) and
`cli` (the CLIs' logging set-up). Keep it that small: no torch, no SQLAlchemy, no UI.
"""
