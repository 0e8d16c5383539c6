"""``ovss`` entry point: sub-commands, user errors as one line on stderr (exit 2), never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from ovss.errors import OvssError

_ONE_SHOT = False  # set by `entry` in the console-script process of `ovss segment`, which exits when done


def one_shot_process() -> bool:
    """True in an ``ovss segment`` console-script process (it ends with ``os._exit``, see :func:`entry`): the
    command may tune the process (garbage collection), which a caller of :func:`main` in Python must not see."""
    return _ONE_SHOT


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
    except BrokenPipeError:  # `ovss methods | head`: the reader left; stop quietly, as other tools do
        _discard_stdout()
        return 141  # 128 + SIGPIPE, the status of a tool that the closed pipe ended


def _discard_stdout() -> None:
    """Point stdout at the null device, so that the flush at exit does not raise BrokenPipeError again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a stdout without a file descriptor
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def entry() -> None:
    """The ``ovss`` console script: :func:`main`, then the exit.

    ``ovss segment`` leaves with ``os._exit`` once its outputs are written and the streams flushed: tearing
    down an interpreter that imported torch costs 0.3-0.4 s, a sixth of a one-photo run. Its files are
    closed (atomic writes) before, and it starts no subprocesses. ``OVSS_FAST_EXIT=0`` restores the normal
    exit (coverage or profilers that report at exit need it).
    """
    global _ONE_SHOT
    from ovss.fields import switched_on

    _ONE_SHOT = sys.argv[1:2] == ["segment"] and switched_on("OVSS_FAST_EXIT")
    code = main()
    if _ONE_SHOT:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: the exit code still gets out
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
