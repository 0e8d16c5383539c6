"""What a run records and how runs are reported: ``config.json``, ``result.md``, Table 1 (``ovss report``).

``run_config`` is the fully resolved configuration written next to every result, with the SHA-256 of
each weight file (computed once per file and process); ``summarise`` turns summed counts into
result.json's metrics; ``result_markdown`` renders one run.

The table has one row per (method, preset) — plus the overridden setting fields, if any — and the
columns V21 PC60 C-Obj V20 PC59 C-Stf City ADE Avg. A cell shows ovss's number and, for mIoU, the
paper's number for that method and preset in parentheses (``ovss.eval.reference``); "–" marks a dataset
that was not evaluated. A run on fewer images than the benchmark's official split (a split file,
``--limit``, an unfinished run) is marked ``*`` and shown without the paper's number, which is a
full-split number. Avg is the mean over the eight datasets and needs all eight on their full splits.
Runs on a user's own folder (``--dataset folder``) are listed in a second table of their own.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ovss.errors import OvssError
from ovss.eval.ber import BoundaryErrorAccumulator, format_ber
from ovss.eval.datasets import SegDataset
from ovss.eval.distributed import DistContext
from ovss.eval.layouts import LAYOUTS
from ovss.eval.metrics import ConfusionAccumulator
from ovss.eval.presets import ResolvedSetting
from ovss.eval.reference import COLUMN_TITLES, COLUMNS, METRICS, Reference, reference_for
from ovss.predictor import Segmenter

MISSING = "–"  # an empty cell
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> hex digest


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file, computed once per (path, size, modification time) in this process."""
    from ovss.storage.files import file_sha256 as sha256_of

    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = sha256_of(resolved)
    return _SHA256_CACHE[key]


def weights_record(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Name, path and SHA-256 of every weight file in a segmenter's config (keys ``<x>`` / ``<x>_path``)."""
    weights: dict[str, dict[str, Any]] = {}
    for key, value in config.items():
        if key.endswith("_path") and value:
            prefix = key[: -len("_path")]
            sha = file_sha256(value) if Path(value).is_file() else config.get(f"{prefix}_sha256")
            weights[prefix] = {"name": config.get(prefix), "path": str(value), "sha256": sha}
            if config.get(f"{prefix}_format"):
                weights[prefix]["format"] = config[f"{prefix}_format"]
            if config.get(f"{prefix}_revision"):  # a Hub id: the commit its revision resolved to
                weights[prefix]["revision"] = config[f"{prefix}_revision"]
    if "clip" not in weights:
        weights["clip"] = {"name": config.get("clip"), "path": None, "sha256": None}
    return weights


def run_config(
    segmenter: Segmenter,
    setting: ResolvedSetting,
    dataset: SegDataset,
    classes: list[list[str]],
    context: DistContext,
    **extra: Any,
) -> dict[str, Any]:
    """The fully resolved configuration written to ``config.json``."""
    import ovss

    config = segmenter.config
    return {
        "method": setting.method,
        "preset": setting.preset,
        "dataset": setting.dataset,
        "name_set": setting.name_set,
        "setting": setting.to_dict(),
        "options": config["options"],
        "pipeline": config["pipeline"],
        "pad_multiple": config["pad_multiple"],
        "classes": classes,
        "class_names": dataset.class_names,
        "num_images": len(dataset),
        "weights": weights_record(config),
        "clip_fingerprint": config.get("clip_fingerprint"),
        "device": config["device"],
        "dtype": config["dtype"],
        "world_size": context.world_size,
        "ovss_version": ovss.__version__,
        "torch_version": torch.__version__,
        **extra,
    }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 2)


def summarise(
    confusion: ConfusionAccumulator, boundary: BoundaryErrorAccumulator, class_names: Sequence[str]
) -> dict[str, Any]:
    """result.json's metrics: mIoU, mAcc, aAcc (percent, 2 decimals, None if undefined), BER, per class, counts."""
    metrics = confusion.compute()
    iou, acc = metrics["IoU"], metrics["Acc"]
    miou, macc, aacc = metrics["mIoU"], metrics["mAcc"], metrics["aAcc"]
    if not isinstance(iou, list) or not isinstance(acc, list):
        raise TypeError(f"per-class IoU/Acc must be lists, got {type(iou).__name__}/{type(acc).__name__}")
    if not isinstance(miou, float) or not isinstance(macc, float) or not isinstance(aacc, float):
        raise TypeError("mIoU, mAcc and aAcc must be floats")
    ber = boundary.compute()
    return {
        "mIoU": _round(miou),
        "mAcc": _round(macc),
        "aAcc": _round(aacc),
        "BER": _round(ber) if not math.isnan(ber) else format_ber(ber),
        "per_class": [
            {"class": name, "IoU": _round(i), "Acc": _round(a)}
            for name, i, a in zip(class_names, iou, acc, strict=True)
        ],
        "counts": {
            "intersection": confusion.intersection.tolist(),
            "pred_area": confusion.pred_area.tolist(),
            "label_area": confusion.label_area.tolist(),
            "ber_errors": boundary.errors,
            "ber_pairs": boundary.pairs,
        },
    }


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return value if isinstance(value, str) else f"{value:.2f}"


def result_markdown(result: dict[str, Any]) -> str:
    """``result.md``: the summary metrics and the per-class IoU / accuracy of one run.

    Args:
        result: the dictionary :func:`ovss.eval.runner.evaluate` returns (and writes to result.json).

    Returns:
        Markdown text ending in a newline.
    """
    partial = "" if result["complete"] else " (partial run)"
    lines = [
        f"# {result['method']} on {result['dataset']}, preset {result['preset']}{partial}",
        "",
        "| mIoU | mAcc | aAcc | BER | images | s / image |",
        "|---|---|---|---|---|---|",
        f"| {_cell(result['mIoU'])} | {_cell(result['mAcc'])} | {_cell(result['aAcc'])} | {_cell(result['BER'])} "
        f"| {result['images']} | {_cell(result['timing']['seconds_per_image'])} |",
        "",
        "| class | IoU | Acc |",
        "|---|---|---|",
    ]
    lines += [f"| {row['class']} | {_cell(row['IoU'])} | {_cell(row['Acc'])} |" for row in result["per_class"]]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RunSummary:
    """What the report needs from one run folder."""

    path: Path  # the run folder
    method: str  # method name
    preset: str  # preset name
    dataset: str  # benchmark name (or "custom")
    overrides: tuple[str, ...]  # "field=value" for every setting field changed from the preset
    result: dict[str, Any]  # content of result.json
    vfm: str | None = None  # the VFM when it is not the method's default (a registered name or a file name)


def read_run(path: str | os.PathLike[str]) -> RunSummary:
    """Read ``result.json`` and ``config.json`` of a run folder.

    Raises:
        OvssError: the folder holds no finished run (result.json missing) or unreadable files.
    """
    folder = Path(path)
    try:
        result = json.loads((folder / "result.json").read_text())
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError as error:
        raise OvssError(f"{folder} holds no finished run ({Path(str(error.filename)).name} missing)") from error
    except (OSError, json.JSONDecodeError) as error:
        raise OvssError(f"cannot read the run in {folder}: {error}") from error
    missing = (
        [key for key in ("method", "preset", "dataset", "images") if key not in result]
        if isinstance(result, dict)
        else ["method"]
    )
    if missing or not isinstance(config, dict):
        what = f"result.json lacks {', '.join(missing)}" if missing else "config.json is not an object"
        raise OvssError(
            f"{folder} is not an ovss eval run ({what}); give `ovss report` the --out folders of `ovss eval`"
        )
    setting = config.get("setting", {})
    setting = setting if isinstance(setting, dict) else {}
    overrides = tuple(f"{key}={setting[key]}" for key in setting.get("overrides", []) if key in setting)
    vfm = _other_vfm(result["method"], config)
    return RunSummary(folder, result["method"], result["preset"], result["dataset"], overrides, result, vfm)


def _other_vfm(method: str, config: Mapping[str, Any]) -> str | None:
    """The run's VFM when it is not of the method's default kind, else None (the papers' main rows apply).

    A registered name other than the default is that name. A local file counts as the default kind when its
    format is the default's (a local copy of DINO ViT-B/8 keeps ProxyCLIP's rows); a file of another format
    takes the name of the one registered VFM of that format (DINOv3), or its file name when that is ambiguous.
    """
    from ovss.methods.registry import get_method
    from ovss.storage import hub

    weights = config.get("weights", {})
    vfm = weights.get("vfm") if isinstance(weights, dict) else None
    name = vfm.get("name") if isinstance(vfm, dict) else None
    if not name or not isinstance(vfm, dict):
        return None
    try:
        spec = get_method(method)
        default = spec.default_weights("vfm") if spec.needs("vfm") else hub.DEFAULT_VFM
    except OvssError:  # a method this version does not know
        default = hub.DEFAULT_VFM
    if name in hub.REGISTRY:
        return None if name == default else str(name)
    fmt = vfm.get("format")
    if fmt is None or fmt == hub.REGISTRY[default].format:
        return None
    same = [e.name for e in hub.REGISTRY.values() if e.kind == "vfm" and e.format == fmt]
    return same[0] if len(same) == 1 else Path(str(name)).name


def _row_label(method: str, preset: str, overrides: tuple[str, ...], vfm: str | None = None) -> str:
    label = f"{method} / {preset}" + (f" / vfm {vfm}" if vfm else "")
    return f"{label} ({', '.join(overrides)})" if overrides else label


def full_split_images(run: RunSummary) -> int:
    """Images of the run's benchmark split: the official count for the eight benchmarks, else the run's own."""
    layout = LAYOUTS.get(run.dataset)
    return layout.expected if layout is not None else int(run.result.get("images", 0))


def is_partial(run: RunSummary) -> bool:
    """Whether the run counted fewer images than its benchmark's full split (or did not finish)."""
    images = int(run.result.get("images", 0))
    return not run.result.get("complete", True) or images < full_split_images(run)


def _row_cells(runs: dict[str, RunSummary], metric: str, reference: Reference | None) -> tuple[list[str], list[str]]:
    """The cells of one table row and the footnote marks it needs."""
    cells, notes = [], []
    values: list[float] = []
    for dataset in COLUMNS:
        run = runs.get(dataset)
        paper = reference.miou.get(dataset) if reference is not None and metric == "mIoU" else None
        if run is None:
            cells.append(MISSING if paper is None else f"{MISSING} ({paper})")
            continue
        value = run.result.get(metric)
        if is_partial(run):
            cells.append(_cell(value) + "*")  # never beside the paper's full-split number
            notes.append(f"{run.path}: {run.result['images']} of {full_split_images(run)} images")
            continue
        if isinstance(value, (int, float)):
            values.append(float(value))
        cells.append(_cell(value) if paper is None else f"{_cell(value)} ({paper})")
    average = f"{sum(values) / len(values):.2f}" if len(values) == len(COLUMNS) else MISSING
    paper_average = reference.average if reference is not None and metric == "mIoU" else None
    cells.append(average if paper_average is None else f"{average} ({paper_average})")
    return cells, notes


def _folder_table(runs: list[RunSummary]) -> list[str]:
    """Runs on users' own folders: one row each, every metric (no paper numbers exist for them)."""
    lines = ["", "Own datasets (`--dataset folder`):", ""]
    lines += ["| run | method / preset | images | mIoU | mAcc | aAcc | BER |", "|" + "---|" * 7]
    for run in runs:
        r = run.result
        images = f"{r.get('images')}" + ("" if r.get("complete", True) else " (unfinished)")
        cells = [str(run.path), _row_label(run.method, run.preset, run.overrides, run.vfm), images]
        cells += [_cell(r.get(key)) for key in ("mIoU", "mAcc", "aAcc", "BER")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(run_dirs: Sequence[str | os.PathLike[str]], metric: str = "mIoU") -> tuple[str, list[str]]:
    """The papers' Table-1 layout over run folders.

    Args:
        run_dirs: run folders written by ``ovss eval`` (``evaluate``'s ``out_dir``).
        metric: mIoU (default; paper numbers alongside), mAcc, aAcc or BER.

    Returns:
        ``(markdown, skipped)``: the table (rows in first-seen order; then a table of the runs on own
        folders, if any) and one line per folder that was left out (no finished run, or a duplicate of
        a later folder).

    Raises:
        OvssError: unknown metric or no usable run.
    """
    if metric not in METRICS:
        raise OvssError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    rows: dict[tuple[str, str, tuple[str, ...], str | None], dict[str, RunSummary]] = {}
    skipped: list[str] = []
    folders: list[RunSummary] = []
    for path in run_dirs:
        try:
            run = read_run(path)
        except OvssError as error:
            skipped.append(str(error))
            continue
        if run.dataset not in COLUMNS:
            folders.append(run)
            continue
        row = rows.setdefault((run.method, run.preset, run.overrides, run.vfm), {})
        if run.dataset in row:
            skipped.append(f"{row[run.dataset].path}: replaced by {run.path} (same method, preset and dataset)")
        row[run.dataset] = run
    if not rows and not folders:
        raise OvssError("no finished run among the given folders: " + "; ".join(skipped))
    if not rows:
        return "\n".join(_folder_table(folders)[1:]) + "\n", skipped
    header = ["method / preset", *(COLUMN_TITLES[d] for d in COLUMNS), "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    footnotes: list[str] = []
    sources: list[str] = []
    for (method, preset, overrides, vfm), runs in rows.items():
        reference = reference_for(method, preset, vfm) if not overrides else None
        cells, notes = _row_cells(runs, metric, reference)
        label = _row_label(method, preset, overrides, vfm)
        lines.append("| " + " | ".join([label, *cells]) + " |")
        footnotes += notes
        if reference is not None and metric == "mIoU":
            sources.append(f"{label}: {reference.source}")
    legend = f"Cells: ovss {metric}" + (" (paper's number in parentheses)" if metric == "mIoU" else "")
    lines += ["", legend + f"; {MISSING} = not evaluated; Avg needs all eight datasets on their full splits."]
    if sources:
        lines.append("Paper numbers: " + "; ".join(sources) + ".")
    if footnotes:
        partial = "\\* partial split, not comparable with the papers' full-split numbers: "
        lines.append(partial + "; ".join(footnotes) + ".")
    if folders:
        lines += _folder_table(folders)
    return "\n".join(lines) + "\n", skipped
