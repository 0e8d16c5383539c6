"""``ovss eval``, ``ovss data check|prepare`` and ``ovss report``: the benchmark harness on the command line.

Thin over ``ovss.eval.presets``, ``ovss.eval.runner``, ``ovss.eval.datasets`` and ``ovss.eval.report``.
Launch ``eval`` with ``torchrun --nproc-per-node N -m ovss eval ...`` to shard it over N processes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ovss.cli.options import add_model_flags, method_of, model_kwargs, options_of, pipeline_of
from ovss.errors import OvssError

_FOLDER = "folder"  # --dataset value for a user's own folder of images and labels


def add_parsers(sub: Any) -> None:
    """Register ``eval``, ``data`` (``check``, ``prepare``) and ``report``."""
    from ovss.eval.names import DATASETS, NAME_SETS
    from ovss.eval.presets import PRESETS
    from ovss.eval.reference import METRICS

    p = sub.add_parser(
        "eval",
        help="evaluate a method on a benchmark or your own labelled folder",
        description="Evaluate a method with a named setting (spec §5) and write config.json, result.json, "
        "result.md (mIoU, mAcc, aAcc, per-class IoU, BER) to --out. Pipeline flags override the preset. "
        "Run under `torchrun --nproc-per-node N -m ovss eval ...` to shard the images over N processes.",
    )
    p.add_argument("--dataset", required=True, choices=[*DATASETS, _FOLDER], help="benchmark, or 'folder'")
    p.add_argument("--root", help="dataset root (the layout's root, its base folder or anything in between)")
    p.add_argument("--split-file", "--split_file", dest="split_file", help="file of sample ids replacing the split")
    p.add_argument("--preset", choices=list(PRESETS), help="named setting (default: the method's own)")
    p.add_argument("--name-set", "--name_set", dest="name_set", choices=NAME_SETS, help="override the name set")
    p.add_argument("--out", required=True, help="run folder (created if missing)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument(
        "--save-predictions",
        "--save_predictions",
        dest="save_predictions",
        action="store_true",
        help="write predictions/<sample>.png (palette PNG of class ids)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument(
        "--checkpoint-every",
        "--checkpoint_every",
        dest="checkpoint_every",
        type=int,
        default=20,
        help="images between checkpoints (default 20)",
    )
    p.add_argument("--ber-band", "--ber_band", dest="ber_band", type=int, default=1, help="BER band width (1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    f = p.add_argument_group("--dataset folder (your own data)")
    f.add_argument("--images", help="folder of images")
    f.add_argument(
        "--masks",
        help="folder of label PNGs paired by file stem: palette or 8-bit PNGs of class ids (255 = ignore) or 16-bit "
        "PNGs (ids beyond 255; 65535 = ignore); or a COCO JSON (`ovss segment --save-coco`'s coco.json: "
        "categories named as the --names classes, images paired by file_name stem)",
    )
    f.add_argument("--labels", dest="old_labels", help=argparse.SUPPRESS)  # renamed --masks: a one-line error
    f.add_argument(
        "--names",
        help="class file, read as `ovss segment --labels-file` reads it: one class per line, synonyms separated "
        "by ',', '|' or ';'",
    )
    f.add_argument("--image-suffix", "--image_suffix", dest="image_suffix", default="", help="e.g. _image")
    f.add_argument("--label-suffix", "--label_suffix", dest="label_suffix", default="", help="e.g. _label")
    f.add_argument(
        "--reduce-zero-label",
        "--reduce_zero_label",
        dest="reduce_zero_label",
        action="store_true",
        help="labels: 0 -> ignore, v -> v - 1",
    )
    f.add_argument(
        "--has-background", "--has_background", dest="has_background", action="store_true", help="class 0 is background"
    )
    add_model_flags(p)
    p.set_defaults(func=run_eval)

    data = sub.add_parser("data", help="check or prepare a benchmark's files")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = data_sub.add_parser("check", help="report layout and counts (exit 1 when incomplete)")
    check.add_argument("name", choices=DATASETS, help="benchmark")
    check.add_argument("--root", required=True, help="dataset root")
    check.add_argument("--split-file", "--split_file", dest="split_file", help="file of sample ids")
    check.set_defaults(func=run_check)
    prepare = data_sub.add_parser("prepare", help="write the converted label files (COCO-Object, Cityscapes)")
    prepare.add_argument("name", choices=["coco_object", "cityscapes"], help="benchmark")
    prepare.add_argument("--root", required=True, help="dataset root")
    prepare.add_argument("--overwrite", action="store_true", help="rewrite existing label files")
    prepare.set_defaults(func=run_prepare)

    report = sub.add_parser("report", help="Table-1 markdown over run folders (`ovss report runs/* > t.md`)")
    report.add_argument("runs", nargs="+", help="run folders written by `ovss eval`")
    report.add_argument("--metric", choices=METRICS, default="mIoU", help="what the cells show (default mIoU)")
    report.set_defaults(func=run_report)


def _open(args: argparse.Namespace) -> Any:
    from ovss.eval.datasets import FolderDataset, open_dataset

    if args.dataset == _FOLDER:
        missing = [flag for flag in ("images", "masks", "names") if not getattr(args, flag)]
        if missing:
            raise OvssError(f"--dataset folder needs {', '.join('--' + m for m in missing)}")
        return FolderDataset(
            args.images,
            args.masks,
            args.names,
            reduce_zero_label=args.reduce_zero_label,
            image_suffix=args.image_suffix,
            label_suffix=args.label_suffix,
            has_background=args.has_background,
        )
    if not args.root:
        raise OvssError(f"--dataset {args.dataset} needs --root DIR (see `ovss data check {args.dataset} --root DIR`)")
    return open_dataset(args.dataset, args.root, args.split_file)


def _setting(args: argparse.Namespace) -> Any:
    from ovss.eval.presets import CUSTOM, SETTING_PIPELINE_KEYS, resolve

    pipeline = pipeline_of(args)
    overrides: dict[str, Any] = {key: value for key, value in pipeline.items() if key in SETTING_PIPELINE_KEYS}
    if args.name_set is not None:
        overrides["name_set"] = args.name_set
    method = method_of(args)
    options = options_of(args, method)
    if options:
        overrides["method_options"] = options
    dataset = CUSTOM if args.dataset == _FOLDER else args.dataset
    return resolve(args.preset, dataset, method, **overrides)


def run_eval(args: argparse.Namespace) -> int:
    from ovss.eval.distributed import distributed_session, rank_device
    from ovss.eval.presets import SETTING_PIPELINE_KEYS
    from ovss.eval.runner import evaluate

    if args.old_labels is not None:
        raise OvssError(f"eval --labels is now --masks (the folder of label PNGs): --masks {args.old_labels}")
    with distributed_session(args.device) as context:
        setting = _setting(args)
        dataset = _open(args)
        load_kwargs: dict[str, Any] = {
            key: value for key, value in pipeline_of(args).items() if key not in SETTING_PIPELINE_KEYS
        }
        load_kwargs.update(model_kwargs(args), device=rank_device(args.device, context))
        result = evaluate(
            dataset,
            load_kwargs,
            setting,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            save_predictions=args.save_predictions,
            progress=args.progress,
            limit=args.limit,
            checkpoint_every=args.checkpoint_every,
            ber_band=args.ber_band,
            root=args.root or args.images,
        )
        if context.is_main:
            print(
                f"{setting.dataset} {setting.method} / {setting.preset}: mIoU {result['mIoU']} mAcc {result['mAcc']} "
                f"aAcc {result['aAcc']} BER {result['BER']} ({result['images']} images) -> {args.out}/result.json",
                file=sys.stderr,
            )
    return 0


def run_check(args: argparse.Namespace) -> int:
    from ovss.eval.datasets import check_dataset

    report = check_dataset(args.name, args.root, args.split_file)
    print(report.summary())
    return 0 if report.complete else 1


def run_prepare(args: argparse.Namespace) -> int:
    from ovss.eval.datasets import prepare_cityscapes, prepare_coco_object

    prepare = prepare_coco_object if args.name == "coco_object" else prepare_cityscapes
    written = prepare(args.root, overwrite=args.overwrite)
    print(f"{args.name}: wrote {written} label file(s) under {args.root}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ovss.eval.report import render_report

    markdown, skipped = render_report(args.runs, args.metric)
    sys.stdout.write(markdown)
    for line in skipped:
        print(f"ovss: note: skipped {line}", file=sys.stderr)
    return 0
