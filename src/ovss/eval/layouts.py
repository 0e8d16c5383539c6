"""Where the eight benchmarks keep their files: the mmsegmentation layouts of spec §6.1.

A :class:`Layout` names a benchmark's base directory chain, image and label folders, file suffixes and
split file. ``find_base`` accepts the layout's root, its base directory or any folder in between;
``layout_tree`` draws the expected tree for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ovss.errors import OvssError
from ovss.eval.names import DATASETS


@dataclass(frozen=True)
class Layout:
    """Where a benchmark's files live, relative to its base directory."""

    base: tuple[str, ...]  # folders from the dataset root down to the base, e.g. ("VOCdevkit", "VOC2012")
    image_dir: str  # image folder under the base
    image_suffix: str  # image file = image_dir / (id + image_suffix)
    label_dir: str  # label folder under the base
    label_suffix: str  # label file = label_dir / (id + label_suffix)
    split_file: str | None  # id list under the base; None = every image matching image_glob
    image_glob: str  # pattern under image_dir that enumerates the images when there is no split file
    expected: int  # images in the official validation split
    has_background: bool  # class 0 is "background"
    reduce_zero_label: bool  # labels are remapped 0 -> 255, v -> v - 1
    source_suffix: str = ""  # label suffix the labels can be prepared from ("" = none)
    prepare: str = ""  # function of ovss.eval.labels that prepares the labels from source_suffix files


_VOC21 = Layout(
    base=("VOCdevkit", "VOC2012"),
    image_dir="JPEGImages",
    image_suffix=".jpg",
    label_dir="SegmentationClass",
    label_suffix=".png",
    split_file="ImageSets/Segmentation/val.txt",
    image_glob="*.jpg",
    expected=1449,
    has_background=True,
    reduce_zero_label=False,
)
_PC60 = replace(
    _VOC21,
    base=("VOCdevkit", "VOC2010"),
    label_dir="SegmentationClassContext",
    split_file="ImageSets/SegmentationContext/val.txt",
    expected=5105,
)
_COCO_STUFF = Layout(
    base=("coco_stuff164k",),
    image_dir="images/val2017",
    image_suffix=".jpg",
    label_dir="annotations/val2017",
    label_suffix="_labelTrainIds.png",
    split_file=None,
    image_glob="*.jpg",
    expected=5000,
    has_background=False,
    reduce_zero_label=False,
)
LAYOUTS: dict[str, Layout] = {
    "voc21": _VOC21,
    "voc20": replace(_VOC21, has_background=False, reduce_zero_label=True),
    "pc60": _PC60,
    "pc59": replace(_PC60, has_background=False, reduce_zero_label=True),
    "coco_object": replace(
        _COCO_STUFF,
        label_suffix="_instanceTrainIds.png",
        has_background=True,
        source_suffix="_labelTrainIds.png",
        prepare="prepare_coco_object",
    ),
    "coco_stuff": _COCO_STUFF,
    "cityscapes": Layout(
        base=("cityscapes",),
        image_dir="leftImg8bit/val",
        image_suffix="_leftImg8bit.png",
        label_dir="gtFine/val",
        label_suffix="_gtFine_labelTrainIds.png",
        split_file=None,
        image_glob="*/*_leftImg8bit.png",
        expected=500,
        has_background=False,
        reduce_zero_label=False,
        source_suffix="_gtFine_labelIds.png",
        prepare="prepare_cityscapes",
    ),
    "ade20k": Layout(
        base=("ADEChallengeData2016",),
        image_dir="images/validation",
        image_suffix=".jpg",
        label_dir="annotations/validation",
        label_suffix=".png",
        split_file=None,
        image_glob="*.jpg",
        expected=2000,
        has_background=False,
        reduce_zero_label=True,
    ),
}


def layout_tree(name: str) -> str:
    """The expected directory tree of a benchmark, as an ASCII drawing (for error messages)."""
    layout = get_layout(name)
    lines = ["<root>/"]
    indent = ""
    for folder in layout.base:
        lines.append(f"{indent}└── {folder}/")
        indent += "    "
    id_name = "<city>/A" if "/" in layout.image_glob else "X"
    leaves = [
        f"{layout.image_dir}/{id_name}{layout.image_suffix}",
        f"{layout.label_dir}/{id_name}{layout.label_suffix}",
    ]
    if layout.split_file is not None:
        leaves.append(f"{layout.split_file}  (one X per line)")
    lines += [f"{indent}{'└──' if i == len(leaves) - 1 else '├──'} {leaf}" for i, leaf in enumerate(leaves)]
    return "\n".join(lines)


def get_layout(name: str) -> Layout:
    """The layout of a benchmark; unknown names raise an OvssError listing the eight."""
    if name not in LAYOUTS:
        raise OvssError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return LAYOUTS[name]


def find_base(root: Path, layout: Layout) -> Path | None:
    """The base directory: ``root/<base chain>``, or a shorter chain when root is already inside it."""
    for start in range(len(layout.base) + 1):
        candidate = root.joinpath(*layout.base[start:])
        if (candidate / layout.image_dir).is_dir() or (candidate / layout.label_dir).is_dir():
            return candidate
    return None
