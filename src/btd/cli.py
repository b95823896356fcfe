"""The `btd` command. Each subcommand has --help; errors print one readable line and exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from btd.errors import BTDError

Handler = Callable[[argparse.Namespace], int]


def _profile(args: argparse.Namespace) -> int:
    from btd import profiles

    if args.apply:
        profiles.apply(args.name, args.params)
        print(f"applied profile '{args.name}' to {args.params}")
    else:
        print(" ".join(profiles.set_args(args.name)))
    return 0


def _readme(args: argparse.Namespace) -> int:
    from pathlib import Path

    from btd import paths
    from btd.report.readme import update

    readme = Path(args.readme) if args.readme else paths.ROOT / "README.md"
    if args.check:
        if update(readme, paths.ROOT, check=True):
            print(f"{readme}: results section is up to date")
            return 0
        print(f"{readme}: results section is out of date; run `btd readme`", file=sys.stderr)
        return 1
    update(readme, paths.ROOT)
    print(f"{readme}: results section regenerated from results/tables")
    return 0


def _clean_report(args: argparse.Namespace) -> int:
    from btd import paths
    from btd.report.notebook import clean_report

    for path in args.notebooks:
        clean_report(path, paths.ROOT)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="btd",
        description="Back-in-Time Diffusion: unsupervised detection of medical deepfakes.",
    )
    from btd import __version__

    parser.add_argument("--version", action="version", version=f"btd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "profile",
        help="switch parameter profile (paper, tiny)",
        description="Print `dvc exp run` -S arguments for a profile, or --apply it to params.yaml. "
        "Example: dvc exp run $(btd profile paper)",
    )
    p.add_argument("name", help="profile name: paper | tiny")
    p.add_argument("--apply", action="store_true", help="rewrite params.yaml with the profile")
    p.add_argument(
        "--params", default="params.yaml", help="params file to rewrite (default params.yaml)"
    )
    p.set_defaults(func=_profile)
    p = sub.add_parser(
        "readme",
        help="regenerate the README's results tables from results/tables",
        description="Rewrite the block between the results markers of README.md from "
        "results/tables/table1.csv and table3.csv (and the paper's numbers). --check only tests it.",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    p.add_argument("--readme", help="README to update (default: the project's README.md)")
    p.set_defaults(func=_readme)
    p = sub.add_parser(
        "clean-report",
        help="make an executed notebook fit to commit (the pipeline runs it after papermill)",
        description="Merge progress-bar chunks into their final line, write paths relative to the "
        "repository root, and drop papermill's timestamps, in place.",
    )
    p.add_argument("notebooks", nargs="+", help="executed notebooks (reports/*.ipynb)")
    p.set_defaults(func=_clean_report)
    _register_detector_commands(sub)
    return parser


def _register_detector_commands(sub: argparse._SubParsersAction) -> None:
    """Detector commands (train, score, calibrate, scan) live in btd.detect.cli when present."""
    try:
        from btd.detect.cli import register
    except ImportError:
        return
    register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BTDError as exc:
        print(f"btd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
