"""Benchmark datasets: image/label pairs of the eight benchmarks and of users' folders (spec §6.1–6.2).

A dataset is a list of (image file, label PNG) pairs; labels are decoded on access and returned at their
original resolution H0 x W0 as uint8 class ids with 255 = ignore (after any remapping); beyond 255 classes
as uint16 with 65535 = ignore (``SegDataset.ignore_index``). Images are only
located here; decoding and resizing belong to the pipeline (§2.1).

``open_dataset(name, root)`` reads one of the eight benchmarks from its mmsegmentation layout; ``root``
may be the base directory of the layout (e.g. ``VOCdevkit/VOC2012``), its parent (``VOCdevkit``) or the
folder that contains the whole chain. ``check_dataset`` reports what is there without raising.
``FolderDataset`` pairs any folder of images with a folder of label PNGs (palette, 8- or 16-bit) by file
stem, or with a COCO JSON by its images' ``file_name`` stems.

Label decoding and remapping live in ``ovss.eval.labels``, the layouts in ``ovss.eval.layouts``; their
public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovss.errors import OvssError
from ovss.eval.labels import (
    CITYSCAPES_LABELID_TO_TRAINID,
    IGNORE_INDEX,
    WIDE_IGNORE_INDEX,
    CocoMasks,
    labelids_to_trainids,
    narrow_labels,
    prepare_cityscapes,
    prepare_coco_object,
    read_label,
    read_label_ids,
    reduce_zero_label,
    trainids_to_coco_object,
    wide_labels,
)
from ovss.eval.layouts import LAYOUTS, Layout, find_base, get_layout, layout_tree
from ovss.eval.names import class_names, read_names_file

__all__ = [
    "CITYSCAPES_LABELID_TO_TRAINID",
    "IGNORE_INDEX",
    "LAYOUTS",
    "DatasetReport",
    "FolderDataset",
    "Layout",
    "Sample",
    "SegDataset",
    "check_dataset",
    "labelids_to_trainids",
    "layout_tree",
    "open_dataset",
    "prepare_cityscapes",
    "prepare_coco_object",
    "read_label",
    "reduce_zero_label",
    "trainids_to_coco_object",
]

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_MAX_LISTED = 5  # missing files named in reports and errors


@dataclass(frozen=True)
class Sample:
    """One evaluation example."""

    name: str  # sample id, e.g. "2007_000033" or "frankfurt/frankfurt_000000_000294"
    image_path: Path  # image file, decoded later by the pipeline (§2.1)
    label: np.ndarray  # (H0, W0) uint8 class ids after remapping, 255 = ignore (uint16, 65535 beyond 255 classes)


class SegDataset:
    """Images paired with label PNGs; labels are decoded (and remapped) on access.

    Attributes:
        dataset: benchmark name (one of ``names.DATASETS``) or ``"custom"``.
        class_names: canonical class names in label order.
        num_classes: C; labels hold 0..C-1 and 255.
        has_background: class 0 is "background" (the background threshold applies).
        reduce_zero_label: labels are remapped 0 -> 255, v -> v - 1 on access.
        ignore_index: 255, or 65535 for more than 255 classes (whose labels are uint16).
    """

    def __init__(
        self,
        sample_names: Sequence[str],
        image_paths: Sequence[Path],
        label_paths: Sequence[Path],
        class_names: Sequence[str],
        has_background: bool,
        reduce_zero_label: bool = False,
        dataset: str = "custom",
    ) -> None:
        if not len(sample_names) == len(image_paths) == len(label_paths):
            raise ValueError("sample_names, image_paths and label_paths must have the same length")
        self.sample_names = list(sample_names)
        self.image_paths = list(image_paths)
        self.label_paths = list(label_paths)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.has_background = has_background
        self.reduce_zero_label = reduce_zero_label
        self.dataset = dataset
        self.ignore_index = IGNORE_INDEX if self.num_classes <= IGNORE_INDEX else WIDE_IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.sample_names)

    def __getitem__(self, index: int) -> Sample:
        """Sample ``index`` with its decoded label.

        Raises:
            IndexError: index out of range.
            OvssError: the label holds an id >= ``num_classes`` other than 255 (wrong dataset or a
                missing/extra ``reduce_zero_label``).
        """
        label_path = self.label_paths[index]
        raw = self._raw_label(index)  # (H0, W0) uint8 or uint16, as stored
        if self.ignore_index == IGNORE_INDEX:
            label = narrow_labels(raw)  # (H0, W0) uint8 (int64 with ids beyond 255: refused below)
            if self.reduce_zero_label:
                label = reduce_zero_label(label)
        else:
            label = wide_labels(raw, self.reduce_zero_label)  # (H0, W0) uint16
        invalid = (label >= self.num_classes) & (label != self.ignore_index)
        if invalid.any():
            raise OvssError(
                f"label {label_path} has id {int(label[invalid].max())} but {self.dataset} has "
                f"{self.num_classes} classes (0..{self.num_classes - 1}, {self.ignore_index} = ignore); "
                "check --dataset (a folder: the --names file, one class per id) and --reduce-zero-label"
            )
        return Sample(self.sample_names[index], self.image_paths[index], label)

    def _raw_label(self, index: int) -> np.ndarray:
        """Sample ``index``'s label as stored: (H0, W0) uint8 or uint16."""
        return read_label_ids(self.label_paths[index])


class FolderDataset(SegDataset):
    """A folder of images paired by file stem with a folder of label PNGs or a COCO JSON (a custom dataset).

    ``images_dir/<key><image_suffix>.<ext>`` pairs with ``labels_dir/<key><label_suffix>.png``; e.g. the
    VOC samples ``0_image.png`` and ``0_label.png`` with ``image_suffix="_image"``,
    ``label_suffix="_label"``. Images whose stem does not end with ``image_suffix`` are skipped.
    Samples are sorted by key and named by it. Label PNGs may be palette, 8-bit or 16-bit greyscale (ids
    beyond 255, for more than 255 classes: then 65535 = ignore). ``labels_dir`` may instead be a COCO JSON
    file (``ovss segment --save-coco``'s coco.json or another tool's): each image pairs with the COCO image
    whose ``file_name`` has the image's stem, and its label map is decoded from the annotations
    (:class:`ovss.eval.labels.CocoMasks`; categories must be the classes of ``names_file``).

    Args:
        images_dir: folder of images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp), not searched recursively.
        labels_dir: folder of label PNGs, or a COCO JSON file.
        names_file: class-name file (see ``names.read_names_file``), one class per line in label order.
        reduce_zero_label: remap labels 0 -> 255, v -> v - 1.
        image_suffix: end of the image stem that is not part of the key.
        label_suffix: end of the label stem that is not part of the key.
        has_background: class 0 is "background" (the background threshold applies).

    Raises:
        OvssError: a folder is missing, no image matches, or some images have no label.
    """

    def __init__(
        self,
        images_dir: str | Path,
        labels_dir: str | Path,
        names_file: str | Path,
        reduce_zero_label: bool = False,
        image_suffix: str = "",
        label_suffix: str = "",
        has_background: bool = False,
    ) -> None:
        images_dir, labels_dir = Path(images_dir), Path(labels_dir)
        coco = labels_dir.suffix.lower() == ".json"
        for folder in (images_dir, labels_dir):
            if coco and folder == labels_dir:
                if not labels_dir.is_file():
                    raise OvssError(f"COCO masks file {labels_dir} not found; pass an existing coco.json")
            elif not folder.is_dir():
                what = "is a file" if folder.is_file() else "not found"
                raise OvssError(f"folder {folder} {what}; pass existing image and label folders (or a coco.json)")
        if coco and (reduce_zero_label or label_suffix):
            raise OvssError("--reduce-zero-label and --label-suffix do not apply to a COCO JSON; drop them")
        self.names = read_names_file(names_file)
        self.coco = CocoMasks(labels_dir, self.names, f"--names {names_file}") if coco else None
        pairs: dict[str, tuple[Path, Path]] = {}
        for image_path in images_dir.iterdir():
            stem = image_path.stem
            if image_path.suffix.lower() not in _IMAGE_EXTENSIONS or not stem.endswith(image_suffix):
                continue
            key = stem[: len(stem) - len(image_suffix)]
            pairs[key] = (image_path, labels_dir / f"{key}{label_suffix}.png")
        if not pairs:
            raise OvssError(
                f"no images ending in '{image_suffix}.<ext>' in {images_dir}; check --images and --image-suffix"
            )
        keys = sorted(pairs)
        if self.coco is not None:
            missing = [pairs[key][0].name for key in keys if pairs[key][0].stem not in self.coco.images]
            if missing:
                raise OvssError(
                    f"{len(missing)} of {len(keys)} images have no entry in {labels_dir} "
                    f"(e.g. {', '.join(missing[:_MAX_LISTED])}); check the image folder and the COCO file"
                )
            pairs = {key: (image, labels_dir) for key, (image, _) in pairs.items()}
        missing = [pairs[key][1].name for key in keys if not pairs[key][1].is_file()]
        if missing:
            raise OvssError(
                f"{len(missing)} of {len(keys)} images have no label in {labels_dir} "
                f"(e.g. {', '.join(missing[:_MAX_LISTED])}); check --masks and --label-suffix"
            )
        super().__init__(
            sample_names=keys,
            image_paths=[pairs[key][0] for key in keys],
            label_paths=[pairs[key][1] for key in keys],
            class_names=[synonyms[0] for synonyms in self.names],
            has_background=has_background,
            reduce_zero_label=reduce_zero_label,
        )

    def _raw_label(self, index: int) -> np.ndarray:
        if self.coco is None:
            return super()._raw_label(index)
        dtype = np.uint8 if self.ignore_index == IGNORE_INDEX else np.uint16
        return self.coco.label(self.image_paths[index].stem, self.ignore_index, dtype)  # (H0, W0)


@dataclass(frozen=True)
class DatasetReport:
    """What ``check_dataset`` found for one benchmark under one root."""

    dataset: str  # benchmark name
    root: Path  # the root the user gave
    base: Path | None  # resolved base directory of the layout; None when it was not found
    expected: int  # official validation images (or the ids of a user split file)
    found: int  # ids whose image and label both exist
    num_missing: int  # image or label files missing for listed ids (or the split file / image folder)
    missing: tuple[str, ...]  # the first few missing files, relative to the base
    hint: str  # how to create the missing files, "" when there is no such advice

    @property
    def ok(self) -> bool:
        """The layout was found, lists at least one sample and no listed file is missing."""
        return self.base is not None and self.found > 0 and self.num_missing == 0

    @property
    def complete(self) -> bool:
        """``ok`` and the number of samples equals the expected count."""
        return self.ok and self.found == self.expected

    def summary(self) -> str:
        """Human-readable multi-line report."""
        where = self.base if self.base is not None else f"{self.root} (layout not found)"
        lines = [f"{self.dataset}: {self.found}/{self.expected} image-label pairs under {where}"]
        if self.num_missing:
            lines.append(f"  {self.num_missing} missing file(s), e.g. {', '.join(self.missing)}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        if not self.ok:
            lines.append("  expected layout:")
            lines += ["    " + line for line in layout_tree(self.dataset).splitlines()]
        elif not self.complete:
            lines.append(f"  usable, but the official split has {self.expected} images")
        return "\n".join(lines)


def _read_ids(split_file: Path) -> list[str]:
    """Non-empty, stripped lines of a split file."""
    return [line.strip() for line in split_file.read_text().splitlines() if line.strip()]


def _list_ids(base: Path, layout: Layout) -> list[str] | None:
    """Sample ids from the layout's split file or its image folder; None if that is missing."""
    if layout.split_file is not None:
        split_file = base / layout.split_file
        return _read_ids(split_file) if split_file.is_file() else None
    image_dir = base / layout.image_dir
    if not image_dir.is_dir():
        return None
    relative = [path.relative_to(image_dir).as_posix() for path in image_dir.glob(layout.image_glob)]
    return sorted(path[: len(path) - len(layout.image_suffix)] for path in relative)


def _scan(name: str, root: str | Path, split_file: str | Path | None) -> tuple[DatasetReport, list[str]]:
    layout = get_layout(name)
    root = Path(root)
    user_ids: list[str] | None = None
    if split_file is not None:
        if not Path(split_file).is_file():
            raise OvssError(f"split file {split_file} not found; pass an existing file with one sample id per line")
        user_ids = _read_ids(Path(split_file))
    expected = layout.expected if user_ids is None else len(user_ids)
    base = find_base(root, layout)
    if base is None:
        return DatasetReport(name, root, None, expected, 0, 0, (), ""), []
    ids = user_ids if user_ids is not None else _list_ids(base, layout)
    if ids is None:  # the split file or the image folder is missing
        missing_list = (layout.split_file or layout.image_dir,)
        return DatasetReport(name, root, base, expected, 0, 1, missing_list, ""), []
    found: list[str] = []
    missing: list[str] = []
    hint = ""
    for sample_id in ids:
        image = f"{layout.image_dir}/{sample_id}{layout.image_suffix}"
        label = f"{layout.label_dir}/{sample_id}{layout.label_suffix}"
        absent = [path for path in (image, label) if not (base / path).is_file()]
        missing += absent
        if not absent:
            found.append(sample_id)
        elif label in absent and layout.source_suffix and not hint:
            source = base / f"{layout.label_dir}/{sample_id}{layout.source_suffix}"
            command = f"`ovss data prepare {name} --root <root>` or ovss.eval.datasets.{layout.prepare}(root)"
            hint = f"run {command} first" if source.is_file() else ""
    report = DatasetReport(name, root, base, expected, len(found), len(missing), tuple(missing[:_MAX_LISTED]), hint)
    return report, found


def check_dataset(name: str, root: str | Path, split_file: str | Path | None = None) -> DatasetReport:
    """Report how much of a benchmark is present under ``root``, without raising for missing files.

    Args:
        name: one of ``names.DATASETS``.
        root: the layout's root folder, its base directory, or any folder in between.
        split_file: optional file of sample ids (one per line) replacing the layout's split; ids are
            paths relative to the image folder without the image suffix (e.g. ``frankfurt/A``).

    Returns:
        The report; ``report.summary()`` is human-readable.

    Raises:
        OvssError: unknown dataset or missing ``split_file``.
    """
    return _scan(name, root, split_file)[0]


def open_dataset(name: str, root: str | Path, split_file: str | Path | None = None) -> SegDataset:
    """Open one of the eight benchmarks from its standard layout (§6.1) with its label handling (§6.2).

    Args:
        name: one of ``names.DATASETS``.
        root: the layout's root folder, its base directory, or any folder in between.
        split_file: optional file of sample ids replacing the layout's split (see ``check_dataset``).

    Returns:
        The dataset, samples in split-file order (or sorted by id when the layout has no split file).

    Raises:
        OvssError: unknown dataset, layout not found, or some listed image/label files are missing;
            the message draws the expected layout.
    """
    report, ids = _scan(name, root, split_file)
    if not report.ok:
        if report.base is None:
            problem = f"no {name} layout found under {report.root}"
        elif report.num_missing:
            problem = f"{report.num_missing} {name} files missing (e.g. {', '.join(report.missing)})"
        else:
            problem = f"no {name} samples listed under {report.base}"
        fix = report.hint or "point root at the folder holding this layout"
        raise OvssError(f"{problem}; {fix}:\n{layout_tree(name)}")
    layout = LAYOUTS[name]
    if report.base is None:  # report.ok implies a layout was found
        raise ValueError(f"{name}: scan reported success without a layout folder")
    return SegDataset(
        sample_names=ids,
        image_paths=[report.base / layout.image_dir / f"{i}{layout.image_suffix}" for i in ids],
        label_paths=[report.base / layout.label_dir / f"{i}{layout.label_suffix}" for i in ids],
        class_names=class_names(name),
        has_background=layout.has_background,
        reduce_zero_label=layout.reduce_zero_label,
        dataset=name,
    )
