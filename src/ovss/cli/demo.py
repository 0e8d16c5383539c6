"""``ovss demo``: a local web page comparing methods on your own photo (needs ``pip install "ovss[demo]"``).

Gradio and torch are imported only when the command runs, so ``ovss --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ovss.cli.options import (
    add_device_flags,
    add_methods_flag,
    add_setting_flags,
    add_weight_flags,
    methods_of,
    options_of,
    pipeline_of,
    weights_of,
)
from ovss.errors import OvssError

INSTALL_HINT = 'ovss demo needs Gradio, an optional extra: pip install "ovss[demo]"'
DEFAULT_METHODS = ("clearclip", "clearclip+gla")  # ticked at first; any can be ticked later


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="a local web page to compare methods on your own photo",
        description="Start a local web app: upload a photo, type labels, compare methods side by side "
        "(e.g. clearclip and clearclip+gla, with the window seams drawn). Prints the address to open. The "
        "weight, device and pipeline flags are those of `ovss segment` and apply to every method.",
    )
    g = p.add_argument_group("methods and weights")
    add_methods_flag(g, DEFAULT_METHODS)
    add_weight_flags(g)
    add_device_flags(g)
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", help='labels typed in the box at first: "sky, road, person|pedestrian"')
    labels.add_argument(
        "--labels-file",
        "--labels_file",
        dest="labels_file",
        help="fill the labels box from a class file, read as `ovss segment --labels-file` reads it",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    add_setting_flags(p)
    p.set_defaults(func=run)


def initial_labels(args: argparse.Namespace) -> str:
    """The labels box's first text: ``--labels`` checked by the box's parser, or ``--labels-file`` as that text."""
    from ovss.labels import format_labels, parse_labels, read_labels_file

    if args.labels is not None:
        parse_labels(args.labels)  # a mistake is one line here, not on the page
        return str(args.labels)
    if args.labels_file is not None:
        return format_labels(read_labels_file(args.labels_file))
    return ""


def pool_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keywords of :class:`~ovss.demo.session.ModelPool`: the weights, device, precision and pipeline settings."""
    return {**weights_of(args), "device": args.device, "dtype": args.dtype, **pipeline_of(args)}


def model_pool(args: argparse.Namespace, loader: Callable[..., Any] | None = None) -> Any:
    """The page's :class:`~ovss.demo.session.ModelPool` from the flags.

    Every method can be ticked on the page, so each gets the ``--opt`` options it declares; an option that
    no registered method declares, or a bad value, is an error here, before anything loads.

    Args:
        args: parsed flags.
        loader: builds a segmenter (default ``ovss.load``); tests pass a recorder.
    """
    from ovss.demo.session import ModelPool
    from ovss.methods import available_methods

    offered = available_methods()
    options = {method: options_of(args, method, offered) for method in offered}
    kwargs = pool_kwargs(args)
    clip = kwargs.pop("clip")
    if not any(options.values()):
        return ModelPool(clip, loader=loader, **kwargs)
    from ovss.api import load

    build: Callable[..., Any] = load if loader is None else loader

    def with_options(method: str, **load_kwargs: Any) -> Any:
        return build(method, **load_kwargs, **options[method])

    return ModelPool(clip, loader=with_options, **kwargs)


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OvssError(INSTALL_HINT) from None
    from ovss.demo.app import build_app, launch
    from ovss.demo.session import DemoSession, check_methods

    methods = check_methods(methods_of(args))  # an unknown name is one line here, before anything loads
    labels = initial_labels(args)
    session = DemoSession(model_pool(args))
    bg_threshold = pipeline_of(args).get("bg_threshold", 0.0)  # the page's slider starts at the flag's value
    app = build_app(session, methods, labels=labels, bg_threshold=bg_threshold)  # a load failure shows on the page
    if session.load_error is not None:
        print(f"ovss: warning: {session.load_error}", file=sys.stderr)
    url = launch(app, args.host, args.port)
    print(f"ovss demo: open {url} in a browser (Ctrl+C stops it)", flush=True)
    app.block_thread()
    return 0
