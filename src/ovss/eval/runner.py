"""The benchmark runner: one method on one dataset, sharded across processes and resumable (spec §7).

Rank r of N evaluates the images i with ``i % N == r``; per image it predicts, adds the prediction to the
confusion counts (mIoU, §7.1) and to the boundary-error counts on the window seams (BER, §7.2). Every
``checkpoint_every`` images (and when interrupted) each rank atomically writes its processed indices and
counts to ``out_dir/checkpoint/``, so ``resume=True`` continues without predicting an image twice and
without counting one twice. At the end the int64 counts are summed across ranks (exact) and rank 0
writes ``result.json``, ``result.md`` and (at the start) ``config.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ovss.errors import OvssError
from ovss.eval.ber import BoundaryErrorAccumulator, boundary_error_counts, boundary_lines
from ovss.eval.checkpoint import (
    CHECKPOINT_DIR,
    RunState,
    checkpoint_path,
    fresh_state,
    load_checkpoint,
    run_identity,
    save_checkpoint,
)
from ovss.eval.datasets import FolderDataset, SegDataset
from ovss.eval.distributed import DistContext, all_reduce_max, all_reduce_sum, current_context
from ovss.eval.metrics import ConfusionAccumulator
from ovss.eval.names import DATASETS, load_names
from ovss.eval.presets import ResolvedSetting
from ovss.eval.report import result_markdown, run_config, summarise
from ovss.methods.options import option_value
from ovss.output.overlay import save_label_png
from ovss.prediction import Prediction
from ovss.predictor import Segmenter
from ovss.storage.files import save_text

# -------------------------------------------------------------------------------------------- segmenter


def dataset_classes(dataset: SegDataset, name_set: str) -> list[list[str]]:
    """The names fed to the text encoder: a folder dataset's own file, else the benchmark's name set."""
    if isinstance(dataset, FolderDataset):
        return [list(names) for names in dataset.names]
    if dataset.dataset not in DATASETS:
        raise OvssError(f"dataset {dataset.dataset!r} has no packaged class names; pass classes= explicitly")
    return load_names(dataset.dataset, name_set)


def build_segmenter(setting: ResolvedSetting, load_kwargs: Mapping[str, Any]) -> Segmenter:
    """``ovss.load`` with the setting's method, pipeline values and method options plus ``load_kwargs``.

    Raises:
        OvssError: ``load_kwargs`` sets a value that belongs to the setting.
    """
    import ovss

    owned = set(setting.pipeline_kwargs()) | set(setting.method_options) | {"method"}
    clash = sorted(owned & set(load_kwargs))
    if clash:
        raise OvssError(f"set {', '.join(clash)} through the setting (presets.resolve(..., name=value)), not here")
    return ovss.load(setting.method, **setting.pipeline_kwargs(), **setting.method_options, **load_kwargs)


def check_segmenter(segmenter: Segmenter, setting: ResolvedSetting) -> None:
    """Raise an OvssError when a given segmenter was built with other values than the setting's."""
    actual: dict[str, Any] = {"method": segmenter.method.name}
    expected: dict[str, Any] = {"method": setting.method}
    for key, value in setting.pipeline_kwargs().items():
        if key == "stride" and setting.crop == 0:
            continue  # the stride is unused in whole-image mode
        actual[key], expected[key] = getattr(segmenter.pipeline, key), value
    for key, value in setting.method_options.items():
        actual[key], expected[key] = option_value(segmenter.options, key, "<absent>"), value
    differ = [f"{key}={actual[key]!r} (setting: {expected[key]!r})" for key in expected if actual[key] != expected[key]]
    if differ:
        raise OvssError(
            f"the segmenter does not match the setting: {', '.join(differ)}; build it with "
            "ovss.eval.runner.build_segmenter(setting, load_kwargs) or pass the load keywords instead"
        )


def _check_out_dir(out_dir: Path, resume: bool, overwrite: bool, context: DistContext) -> None:
    """Refuse, on every rank alike, to replace the run in ``out_dir`` (config, result or checkpoints) unless
    ``overwrite``; ``resume`` continues it when checkpoints are there (checked when loaded) or no result is."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OvssError(f"--out '{out_dir}' is a file; give a run folder (it is created if missing)")
    checkpoints = list((out_dir / CHECKPOINT_DIR).glob("rank*-of-*.pt"))
    result, config = out_dir / "result.json", out_dir / "config.json"
    held = result.exists() or config.exists() or bool(checkpoints)
    continued = resume and (bool(checkpoints) or not result.exists())
    existing = held and not continued and not overwrite
    refuse = all_reduce_max(torch.tensor([int(existing)], dtype=torch.int64), context)  # (1,) any rank
    if int(refuse[0]):
        try:
            record = json.loads(config.read_text())
            what = f"{record['method']} on {record['dataset']}, preset {record['preset']}"
        except (OSError, ValueError, KeyError, TypeError):
            what = "another run"
        raise OvssError(
            f"{out_dir} already holds a run ({what}); pass --resume to continue the same configuration, "
            "--overwrite to replace it, or choose another --out"
        )


def _start_state(
    out_dir: Path, context: DistContext, resume: bool, identity: str, num_classes: int, band: int, ignore: int = 255
) -> RunState:
    path = checkpoint_path(out_dir, context)
    suffix = f"-of-{context.world_size}.pt"
    others = [p for p in (out_dir / CHECKPOINT_DIR).glob("rank*-of-*.pt") if not p.name.endswith(suffix)]
    if resume and path.is_file():
        return load_checkpoint(path, identity, num_classes, band, ignore)
    if resume and others:
        raise OvssError(
            f"the checkpoint in {out_dir} was written by {others[0].stem.split('-of-')[1]} processes; resume with "
            f"the same number of processes (this run has {context.world_size}) or drop --resume to start again"
        )
    path.unlink(missing_ok=True)
    if context.is_main:
        for stale in [*others, out_dir / "result.json", out_dir / "result.md"]:
            stale.unlink(missing_ok=True)
    return fresh_state(num_classes, band, ignore)


# ---------------------------------------------------------------------------------------------- running


def _unique_placeholders(classes: list[list[str]]) -> list[list[str]] | None:
    """Unique stand-in names when a name occurs twice (COCO-Object's ``bed``), else None."""
    flat = [name for names in classes for name in names]
    if len(set(flat)) == len(flat):
        return None
    return [[f"{name} #{c}.{j}" for j, name in enumerate(names)] for c, names in enumerate(classes)]


def _predictor(segmenter: Segmenter, classes: list[list[str]]) -> Callable[[Path], Prediction]:
    """``image path -> Prediction`` scoring the classes exactly as given.

    ``Segmenter.predict`` rejects a name used twice, which COCO-Object's bg-rename and full-rename sets do
    (``bed`` is a background synonym and a class). For such sets every name is encoded as given and the
    classes are passed as unique stand-in names with those embeddings: the joint softmax still runs over
    all Q names, duplicates included, as in the releases.
    """
    placeholders = _unique_placeholders(classes)
    if placeholders is None:
        return lambda image: segmenter.predict(image, classes)
    text = segmenter.encode_names([name for names in classes for name in names])  # (Q, E) unit rows
    return lambda image: segmenter.predict(image, placeholders, text_embeddings=text)


@dataclass
class _Totals:
    """Counts summed over all ranks."""

    confusion: ConfusionAccumulator  # summed per-class areas
    boundary: BoundaryErrorAccumulator  # summed BER counts
    images: int  # images counted by all ranks together
    predict_seconds: float  # prediction time summed over ranks
    slowest_seconds: float  # prediction time of the slowest rank


def _reduce_states(state: RunState, context: DistContext, num_classes: int, band: int) -> _Totals:
    """Sum every rank's int64 counts (exact) and prediction times."""
    counts = torch.cat(
        [
            state.confusion.intersection,
            state.confusion.pred_area,
            state.confusion.label_area,
            torch.tensor([state.boundary.errors, state.boundary.pairs, len(state.done)], dtype=torch.int64),
        ]
    )  # (3C + 3,) int64
    total = all_reduce_sum(counts, context)  # (3C + 3,) int64
    seconds = torch.tensor([state.predict_seconds], dtype=torch.float64)  # (1,)
    C = num_classes
    confusion = ConfusionAccumulator(C)
    confusion.intersection = total[:C].clone()  # (C,)
    confusion.pred_area = total[C : 2 * C].clone()  # (C,)
    confusion.label_area = total[2 * C : 3 * C].clone()  # (C,)
    boundary = BoundaryErrorAccumulator(band)
    boundary.errors, boundary.pairs = int(total[3 * C]), int(total[3 * C + 1])
    return _Totals(
        confusion,
        boundary,
        int(total[3 * C + 2]),
        float(all_reduce_sum(seconds, context)),
        float(all_reduce_max(seconds, context)),
    )


def _score_image(
    labels: torch.Tensor, label: Any, xs: Any, ys: Any, num_classes: int, band: int, ignore: int = 255
) -> tuple[ConfusionAccumulator, tuple[int, int]]:
    """One image's confusion counts and (BER errors, BER pairs), computed before anything is committed."""
    confusion = ConfusionAccumulator(num_classes, ignore)
    confusion.update(labels, label)
    return confusion, boundary_error_counts(labels, label, xs, ys, band, ignore)


def evaluate(
    dataset: SegDataset,
    segmenter: Segmenter | Mapping[str, Any],
    setting: ResolvedSetting,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    save_predictions: bool = False,
    progress: bool = True,
    limit: int | None = None,
    checkpoint_every: int = 20,
    ber_band: int = 1,
    classes: Sequence[Sequence[str]] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a method on a dataset: mIoU, mAcc, aAcc, per-class IoU and BER.

    Runs in every process of a ``torch.distributed`` group (each takes the images i with
    ``i % world_size == rank``) or alone. Call it inside ``distributed.distributed_session`` when launched
    by torchrun.

    Args:
        dataset: the images and labels (``open_dataset`` or ``FolderDataset``).
        segmenter: a :class:`Segmenter` built for ``setting``, or keywords for ``ovss.load`` (clip, tokenizer,
            device, dtype, templates, ...) from which one is built with the setting's values.
        setting: the resolved preset values (``ovss.eval.presets.resolve``).
        out_dir: run folder: config.json, result.json, result.md, checkpoint/, predictions/.
        resume: continue from the checkpoints in ``out_dir`` (same configuration and process count).
        overwrite: replace the run already in ``out_dir``; without it (and without ``resume``) a folder
            holding a run (config.json, result.json or checkpoints) raises before any work.
        save_predictions: write each prediction as ``predictions/<sample>.png`` (palette PNG of class ids).
        progress: show a progress bar with ETA on rank 0 (stderr).
        limit: evaluate only the first ``limit`` images (a later ``resume`` without it finishes the rest).
        checkpoint_every: images between checkpoints of each rank.
        ber_band: BER band width δ >= 1 (§7.2 step 7).
        classes: names fed to the text encoder per class; default: the dataset's (``dataset_classes``).
        root: dataset root, recorded in config.json.

    Returns:
        The content of result.json: mIoU, mAcc, aAcc (percent, 2 decimals; None when undefined), BER
        (percent or "n/a"), per_class, exact counts, images, timing (seconds).

    Raises:
        OvssError: bad arguments, a run in ``out_dir`` (without resume or overwrite), a checkpoint of another
            configuration, unreadable samples.
    """
    started = time.perf_counter()
    context = current_context()
    out = Path(out_dir)
    if limit is not None and limit < 1:
        raise OvssError(f"limit must be >= 1 image, got {limit}")
    if ber_band < 1:
        raise OvssError(f"ber_band (--ber-band) is a band width in pixels, >= 1; got {ber_band}")
    if checkpoint_every < 1:
        raise OvssError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    _check_out_dir(out, resume, overwrite, context)
    names = [list(n) for n in classes] if classes is not None else dataset_classes(dataset, setting.name_set)
    if len(names) != dataset.num_classes:
        raise OvssError(f"{len(names)} class-name entries for {dataset.num_classes} classes; give one per class")
    if isinstance(segmenter, Segmenter):
        check_segmenter(segmenter, setting)
        model = segmenter
    else:
        model = build_segmenter(setting, segmenter)
    identity = run_identity(model.config, setting, names, dataset, ber_band)
    ignore = getattr(dataset, "ignore_index", 255)  # 65535 beyond 255 classes (16-bit labels)
    state = _start_state(out, context, resume, identity, dataset.num_classes, ber_band, ignore)
    if context.is_main:  # after _start_state: a refused resume leaves the run's config.json as it was
        record = run_config(model, setting, dataset, names, context, root=None if root is None else str(root))
        record.update(limit=limit, ber_band=ber_band)
        save_text(out / "config.json", json.dumps(record, indent=2, default=str) + "\n")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    mine = [i for i in range(count) if i % context.world_size == context.rank]
    todo = [i for i in mine if i not in state.done]
    predict = _predictor(model, names)
    checkpoint = checkpoint_path(out, context)
    from tqdm import tqdm

    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=f"{setting.dataset} {setting.method}",
        unit="img",
        disable=not progress or not context.is_main,
        file=sys.stderr,
    )
    committing = False  # True while one image's counts are being added (never checkpoint half an image)
    try:
        for position, index in enumerate(todo, start=1):
            sample = dataset[index]
            tick = time.perf_counter()
            prediction: Prediction = predict(sample.image_path)
            labels = prediction.labels.cpu()  # (H0, W0) int64
            elapsed = time.perf_counter() - tick
            if tuple(labels.shape) != sample.label.shape:
                raise OvssError(
                    f"sample {sample.name}: image is {tuple(labels.shape)} but its label is {sample.label.shape}; "
                    "labels must have the image's size"
                )
            windows, (height, width) = model.current_windows()
            xs, ys = boundary_lines(windows, height, width, *sample.label.shape)
            image_confusion, (errors, pairs) = _score_image(
                labels, sample.label, xs, ys, dataset.num_classes, ber_band, ignore
            )
            if save_predictions:
                save_label_png(labels.numpy(), out / "predictions" / f"{sample.name}.png")
            committing = True
            state.confusion.merge(image_confusion)
            state.boundary.errors += errors
            state.boundary.pairs += pairs
            state.done.add(index)
            state.predict_seconds += elapsed
            committing = False
            bar.update(1)
            if position % checkpoint_every == 0:
                save_checkpoint(checkpoint, state, identity)
    finally:
        bar.close()
        if not committing:  # after an interruption too: the finished images stay counted
            save_checkpoint(checkpoint, state, identity)
    totals = _reduce_states(state, context, dataset.num_classes, ber_band)
    images = totals.images
    result = {
        "dataset": setting.dataset,
        "method": setting.method,
        "preset": setting.preset,
        "name_set": setting.name_set,
        "images": images,
        "complete": images == len(dataset),
        **summarise(totals.confusion, totals.boundary, dataset.class_names),
        "timing": {
            "wall_seconds": round(time.perf_counter() - started, 3),
            "predict_seconds": round(totals.predict_seconds, 3),
            "slowest_rank_predict_seconds": round(totals.slowest_seconds, 3),
            "seconds_per_image": round(totals.predict_seconds / images, 4) if images else None,
            "world_size": context.world_size,
        },
    }
    if context.is_main:
        save_text(out / "result.json", json.dumps(result, indent=2) + "\n")
        save_text(out / "result.md", result_markdown(result))
    return result
