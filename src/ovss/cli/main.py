"""``ovss`` entry point: sub-commands, user errors as one line on stderr (exit 2), never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ovss.errors import OvssError


def build_parser() -> argparse.ArgumentParser:
    from ovss.cli import bench, cache, demo, download, evaluate, info, segment

    parser = argparse.ArgumentParser(
        prog="ovss", description="Training-free open-vocabulary semantic segmentation with frozen CLIP."
    )
    parser.add_argument("--version", action="version", version=f"ovss {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    segment.add_parser(sub)
    info.add_parsers(sub)
    evaluate.add_parsers(sub)
    download.add_parser(sub)
    demo.add_parser(sub)
    cache.add_parser(sub)
    bench.add_parser(sub)
    return parser


def _version() -> str:
    from ovss import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except OvssError as err:
        print(f"ovss: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ovss: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
