"""The ``reasonseg`` command: one entry point, one subcommand per job.

Each subcommand is declared by a small ``_add_*`` function that builds its parser and points ``func``
at a runner; heavy imports (torch, transformers) happen inside the runners so ``reasonseg --help``
stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _add_fetch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch", help="download and verify named weights into the cache")
    p.add_argument("names", nargs="*", help="artifact names (see --list)")
    p.add_argument("--list", action="store_true", help="list known artifacts and their sources")

    def run(args: argparse.Namespace) -> int:
        from reasonseg import weights

        if args.list or not args.names:
            for art in weights.REGISTRY.values():
                print(f"{art.name:28s} {art.filename}  sha256={art.sha256[:12]}…  {art.description}")
                for src in art.sources:
                    print(f"{'':28s}   <- {src.describe()}")
            print(f"cache: {weights.cache_dir()}")
            return 0
        for name in args.names:
            path = weights.fetch(name, progress=lambda m: print(m, file=sys.stderr))
            print(path)
        return 0

    p.set_defaults(func=run)


_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_fetch,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by ``main`` and by the docs/tests that check the help text)."""
    parser = argparse.ArgumentParser(
        prog="reasonseg",
        description="Reasoning segmentation: image + instruction -> answer, masks, or 'not in this image'.",
    )
    from reasonseg import __version__

    parser.add_argument("--version", action="version", version=f"reasonseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for build in _BUILDERS:
        build(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code. Errors are one line on stderr, exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"reasonseg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
