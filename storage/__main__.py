"""`python -m storage`: create the database, import prompts, preference pairs and a version's
labels of its own answers, export, stats.

Every command takes `--db URL` (default: sqlite in $DPO_STUDIO_DATA, else ./data).
"""

from __future__ import annotations

import argparse
import os
import sys

from sqlalchemy import make_url
from sqlalchemy.orm import Session, sessionmaker

from common.cli import setup_logging
from storage.agreement import (
    AgreementReport,
    agreement_report,
    label_event_counts,
    load_judgements,
)
from storage.db import StorageError, default_url, open_db
from storage.io import (
    EXPORT_FORMATS,
    KTO_FORMAT,
    export_preferences,
    import_pairs,
    import_prompts,
)
from storage.models import SCHEMA_VERSION, SPLITS
from storage.rankings import LabelingRate, labeling_rates
from storage.repo import store_stats, unknown_annotators
from storage.rounds import find_version
from storage.selection import DEFAULT_TRAIN_ON, DEFAULT_VOTES, TRAIN_ON, VOTE_MODES, VoteSelection
from storage.self_labels import add_self_labels, read_self_labels, self_label_agreement
from storage.verdicts import kto_rows, verdict_counts


def cmd_init(db: sessionmaker[Session], args: argparse.Namespace) -> int:
    where = make_url(args.db).render_as_string(hide_password=True)
    print(f"database ready: {where} (schema version {SCHEMA_VERSION})")
    return 0


def cmd_import_prompts(db: sessionmaker[Session], args: argparse.Namespace) -> int:
    with db.begin() as session:
        result = import_prompts(session, args.file, split=args.split)
    print(
        f"{args.file}: {result.added} prompts added, {result.duplicates} already there or "
        f"repeated, {result.blank} blank skipped"
    )
    return 0


def cmd_import_pairs(db: sessionmaker[Session], args: argparse.Namespace) -> int:
    with db.begin() as session:
        result = import_pairs(session, args.file, annotator=args.annotator, split=args.split)
    print(
        f"{args.file}: {result.pairs} pairs read, {result.new_votes} new, "
        f"{result.pairs - result.new_votes - result.identical} already there, "
        f"{result.identical} skipped (chosen == rejected)"
    )
    return 0


def cmd_import_self_labels(db: sessionmaker[Session], args: argparse.Namespace) -> int:
    file = read_self_labels(args.file, args.version)
    if file.version is None:
        print(f"{args.file}: no labels; nothing added")
        return 0
    with db.begin() as session:
        result = add_self_labels(session, file.version, file.labels, base_model=args.base_model)
    print(
        f"{args.file}: {len(file.labels)} labels read, {result.added} new votes by "
        f"{result.annotator}, {result.already} already there"
    )
    return 0


def cmd_export(db: sessionmaker[Session], args: argparse.Namespace) -> int:
    split = None if args.split == "all" else args.split
    with db.begin() as session:
        train_on, parent_id = export_round(session, args)
    selection = VoteSelection(
        votes=args.votes,
        leave_out=tuple(args.leave_out),
        include_judges=args.include_judges,
        include_self=args.include_self,
        train_on=train_on,
        parent_id=parent_id,
    )
    with db.begin() as session:
        for name in unknown_annotators(session, selection):
            print(f"warning: no votes by {name!r}: nothing to leave out for them", file=sys.stderr)
        n = export_preferences(
            session, args.file, fmt=args.format, split=split, selection=selection
        )
    if args.format == KTO_FORMAT:  # storage/verdicts.py: each vote counts on its own
        print(f"{args.file}: {n} KTO rows written (kto format, every verdict and vote)")
        return 0
    parent = args.on_version or args.parent
    rounds = "" if train_on == DEFAULT_TRAIN_ON else f", train on: {train_on} from {parent}"
    print(f"{args.file}: {n} pairs written ({args.format} format, votes: {args.votes}{rounds})")
    return 0


def export_round(session: Session, args: argparse.Namespace) -> tuple[str, int | None]:
    """(train_on, parent version id) from `--on-version V` (the pairs on V's answers) or
    `--train-on MODE --parent V`; ValueError for a combination that says two things."""
    train_on, parent = args.train_on, args.parent
    if args.on_version:
        if train_on not in (None, "parent") or parent not in (None, args.on_version):
            raise ValueError(
                "--on-version V is --train-on parent --parent V: give one or the other"
            )
        train_on, parent = "parent", args.on_version
    train_on = train_on or DEFAULT_TRAIN_ON
    if train_on != DEFAULT_TRAIN_ON and not parent:
        raise ValueError(
            f"--train-on {train_on} needs --parent VERSION: the version the round continues "
            "from (e.g. --parent v3)"
        )
    if not parent:
        return train_on, None
    return train_on, find_version(session, parent, args.base_model).id


def cmd_stats(db: sessionmaker[Session], args: argparse.Namespace) -> int:
    with db.begin() as session:
        stats = store_stats(session)
    prompts = ", ".join(f"{n} {split}" for split, n in stats.prompts.items())
    print(f"prompts:   {sum(stats.prompts.values())} ({prompts})")
    print(f"responses: {stats.responses}")
    for who, counts in [
        ("all", stats.overall),
        ("by people", stats.people),
        *stats.by_annotator.items(),
    ]:
        choices = ", ".join(f"{c} {n}" for c, n in counts.by_choice.items())
        print(
            f"votes {who}: {counts.votes} ({choices}); usable training pairs {counts.usable_pairs}"
        )
    with db.begin() as session:
        kto = kto_rows(session, split=None)
        verdicts = verdict_counts(session, "").everyone
        print(f"verdicts on single answers: {verdicts}; KTO rows (human votes) {len(kto.rows)}")
        events = label_event_counts(session)
        print_agreement(agreement_report(load_judgements(session), events=events))
        for row in self_label_agreement(session):
            print(row.sentence())
        print_rates(labeling_rates(session))
    return 0


def print_rates(rates: list[LabelingRate]) -> None:
    """Pairs per minute of annotator time, the 2-answer screen against rankings."""
    for r in rates:
        per_minute = "-" if r.pairs_per_minute is None else f"{r.pairs_per_minute:.1f}"
        usable = "-" if r.usable_per_minute is None else f"{r.usable_per_minute:.1f}"
        print(
            f"pairs per minute, {r.screen}: {per_minute} ({usable} usable for training; "
            f"{r.pairs} pairs from {r.labels} labels in {r.seconds / 60:.1f} min)"
        )


def print_agreement(report: AgreementReport) -> None:
    def num(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    print(
        f"agreement: Krippendorff's alpha {num(report.alpha)}, Gwet's AC1 {num(report.ac1)} "
        f"over {report.units_with_overlap} pairs with two or more votes"
    )
    for q in report.annotators:
        flag = "  <- position bias" if q.side_biased else ""
        print(
            f"  {q.annotator}: {q.votes} votes, agrees with the others' majority "
            f"{num(q.agreement_with_majority, '.0%')} of {q.compared_units}, median "
            f"{num(q.median_seconds, '.1f')} s, left side {num(q.share_left, '.0%')}, "
            f"{q.skips} skips, {q.regenerations} regenerations{flag}"
        )
    for u in report.contested[:5]:
        if u.disagreement > 0:
            votes = ", ".join(f"{v} {n}" for v, n in u.counts.items())
            print(f"  contested: responses {u.unit[0]} and {u.unit[1]}: {votes}")


def add_round_args(p: argparse.ArgumentParser) -> None:
    """export's rounds: the pairs a round would train on (storage/rounds.py)."""
    p.add_argument(
        "--on-version",
        metavar="VERSION",
        help="only the pairs labeled on this version's answers (same as --train-on parent "
        "--parent VERSION)",
    )
    p.add_argument(
        "--train-on",
        choices=TRAIN_ON,
        help="the pairs a run continuing from --parent uses: parent (only those on its "
        "answers), all (default), newest (all, with a weight column: x0.5 per version back)",
    )
    p.add_argument("--parent", metavar="VERSION", help="the version the round continues from")
    p.add_argument(
        "--base-model", help="the base model whose versions are meant, when several have a v3"
    )


def add_export_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`export`: the pairs (or KTO rows) of the votes chosen, for TRL / datasets."""
    p = sub.add_parser("export", parents=[common], help="write preferences for TRL / datasets")
    p.add_argument("file", help=".jsonl, .json, .parquet, or a new directory (save_to_disk)")
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="standard",
        help="standard / conversational: TRL preference pairs; kto: every verdict and vote as "
        "TRL unpaired rows (prompt, completion, label) for KTO (default: %(default)s)",
    )
    p.add_argument("--split", choices=(*SPLITS, "all"), default="all")
    p.add_argument(
        "--votes",
        choices=VOTE_MODES,
        default=DEFAULT_VOTES,
        help="answers judged by several annotators: the majority's choice (a tie of votes "
        "does not train), only unanimous ones, or every vote as its own pair (default: "
        "%(default)s)",
    )
    p.add_argument(
        "--leave-out",
        action="append",
        default=[],
        metavar="NAME",
        help="ignore this annotator's votes (repeatable)",
    )
    p.add_argument(
        "--include-judges",
        action="store_true",
        help="also use votes by AI judges (annotators named judge:<name>); off by default",
    )
    p.add_argument(
        "--include-self",
        action="store_true",
        help="also use versions' labels of their own answers (annotators named self:<version>), "
        "each with its weight (a weight column); a person's vote on the same answers overrides "
        "them; off by default",
    )
    add_round_args(p)
    p.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=None, help="SQLAlchemy URL (default: %(default)s)")
    parser = argparse.ArgumentParser(prog="python -m storage", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("init", parents=[common], help="create the database").set_defaults(func=cmd_init)
    p = sub.add_parser("import-prompts", parents=[common], help="add prompts from a file")
    p.add_argument("file", help=".txt (one per line), .jsonl/.json/.csv/.parquet, or a directory")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.set_defaults(func=cmd_import_prompts)
    p = sub.add_parser("import-pairs", parents=[common], help="add TRL-format preference pairs")
    p.add_argument("file", help="prompt/chosen/rejected, standard or conversational")
    p.add_argument("--annotator", default="import", help="recorded as the pairs' annotator")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.set_defaults(func=cmd_import_pairs)
    p = sub.add_parser(
        "import-self-labels",
        parents=[common],
        help="add a version's labels of its own answers (`python -m dpo_core self-label`'s file)",
    )
    p.add_argument("file", help=".jsonl: prompt, chosen, rejected, margin, scorer, weight")
    p.add_argument(
        "--version", help="the version whose answers they are (default: the rows' annotator)"
    )
    p.add_argument("--base-model", help="the base model meant, when several have that version")
    p.set_defaults(func=cmd_import_self_labels)
    add_export_parser(sub, common)
    sub.add_parser(
        "stats", parents=[common], help="counts per split, choice, annotator"
    ).set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    args.db = args.db or default_url()
    if not args.verbose:  # no progress bars on a CLI that prints one line of results
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(open_db(args.db), args)
    except (StorageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
