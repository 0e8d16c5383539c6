"""``ovss demo``: a local web page comparing methods on your own photo (needs ``pip install "ovss[demo]"``).

Gradio and torch are imported only when the command runs, so ``ovss --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ovss.errors import OvssError

INSTALL_HINT = 'ovss demo needs Gradio, an optional extra: pip install "ovss[demo]"'


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="a local web page to compare methods on your own photo",
        description="Start a local web app: upload a photo, type labels, compare methods side by side "
        "(e.g. clearclip and clearclip+gla, with the window seams drawn). Prints the address to open.",
    )
    p.add_argument("--clip", default="ViT-B/16", help="CLIP weights: a name from `ovss models` or a local file")
    p.add_argument("--vfm", help="vision foundation model of DINO-guided methods (default dino-vitb8)")
    p.add_argument(
        "--methods",
        default="clearclip,clearclip+gla",
        help="methods ticked at first, comma-separated (default clearclip,clearclip+gla); any can be ticked later",
    )
    p.add_argument("--tokenizer", help="CLIP BPE vocabulary (.txt.gz) or HF tokenizer folder (default: cached)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="backbone precision")
    p.add_argument("--offline", action="store_true", help="never download; the page says which file is missing")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OvssError(INSTALL_HINT) from None
    from ovss.demo.app import build_app, launch
    from ovss.demo.session import DemoSession, ModelPool, check_methods

    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    check_methods(methods)  # an unknown name is one line here, before anything loads
    pool = ModelPool(
        args.clip,
        vfm=args.vfm,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        download=not args.offline,
    )
    session = DemoSession(pool)
    app = build_app(session, methods)  # builds the segmenters of `methods`; a failure is shown on the page
    if session.load_error is not None:
        print(f"ovss: warning: {session.load_error}", file=sys.stderr)
    url = launch(app, args.host, args.port)
    print(f"ovss demo: open {url} in a browser (Ctrl+C stops it)", flush=True)
    app.block_thread()
    return 0
