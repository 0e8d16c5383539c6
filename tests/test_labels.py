"""Class lists from the command line, from files and from the Python API."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from ovss.errors import OvssError
from ovss.labels import background_class, flatten_labels, normalize_labels, parse_labels, read_labels_file

# ----------------------------------------------------------------------------------------------------
# parse_labels (--labels)


def test_parse_labels_classes_and_synonyms() -> None:
    assert parse_labels("sky, road, person|pedestrian") == [["sky"], ["road"], ["person", "pedestrian"]]


def test_parse_labels_strips_only_surrounding_whitespace() -> None:
    parsed = parse_labels("  Sky ,traffic light\t,  person | pedestrian  ,trafficlight")
    assert parsed == [["Sky"], ["traffic light"], ["person", "pedestrian"], ["trafficlight"]]


def test_parse_labels_single_class() -> None:
    assert parse_labels("cat") == [["cat"]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("sky,,road", "class 1 .* is empty"),
        ("sky, road,", "class 2 .* is empty"),
        (", sky", "class 0 .* is empty"),
        ("sky, person|", "empty synonym"),
        ("sky, |person", "empty synonym"),
    ],
)
def test_parse_labels_rejects_empty_entries(text: str, message: str) -> None:
    with pytest.raises(OvssError, match=message):
        parse_labels(text)


def test_parse_labels_rejects_duplicates_naming_both_classes() -> None:
    with pytest.raises(OvssError, match=r"'person' is used in classes 0 and 2"):
        parse_labels("person, road, pedestrian|person")
    with pytest.raises(OvssError, match=r"'cat' is used twice in class 1"):
        parse_labels("dog, cat | cat")


def test_duplicate_check_is_verbatim() -> None:
    # Names are not case-folded: 'Sky' and 'sky' are different strings.
    assert parse_labels("Sky, sky") == [["Sky"], ["sky"]]


def test_allow_duplicates_accepts_reference_name_sets() -> None:
    # The reference COCO-Object name sets list "bed" as a background synonym and as a class of its own.
    assert parse_labels("sky|bed, person, bed", allow_duplicates=True) == [
        ["sky", "bed"],
        ["person"],
        ["bed"],
    ]


# ----------------------------------------------------------------------------------------------------
# read_labels_file


def test_read_labels_file_separators_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text(
        "# my classes\n"
        "\n"
        "sky, wall, tree\n"
        "person, person in shirt, person in jeans   # SCLIP-style synonyms\n"
        "   \n"
        "car|automobile\n"
        "tvmonitor; screen\n"
        "bicycle | bike ; cycle\n"
        "\tcafé\n",
        encoding="utf-8",
    )
    with pytest.warns(UserWarning, match="one class with 3 synonyms") as caught:
        classes = read_labels_file(path)
    assert len(caught) == 2  # lines 3 and 4 (three comma names each); '|' and ';' lines are deliberate
    assert "line 3" in str(caught[0].message) and "line 4" in str(caught[1].message)
    assert classes == [
        ["sky", "wall", "tree"],
        ["person", "person in shirt", "person in jeans"],
        ["car", "automobile"],
        ["tvmonitor", "screen"],
        ["bicycle", "bike", "cycle"],
        ["café"],
    ]
    with pytest.warns(UserWarning):
        assert read_labels_file(str(path)) == classes


def test_two_comma_names_or_pipes_do_not_warn(tmp_path: Path) -> None:
    import warnings

    path = tmp_path / "classes.txt"
    path.write_text("person, pedestrian\nsky | heaven | firmament\nroad\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_labels_file(path) == [["person", "pedestrian"], ["sky", "heaven", "firmament"], ["road"]]


def test_background_class_by_name_or_literal_background() -> None:
    classes = [["cat"], ["Background", "bg"], ["tree", "plant"]]
    assert background_class(classes) == 1  # a class named background, any case
    assert background_class(classes, "plant") == 2 and background_class(classes, " cat ") == 0
    assert background_class([["cat"], ["dog"]]) is None
    with pytest.raises(OvssError, match="'sky' is not one of the labels"):
        background_class(classes, "sky")


def test_read_labels_file_with_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "windows.txt"
    path.write_bytes("\ufeffStraße\r\nBrücke, bridge\r\n".encode())
    assert read_labels_file(path) == [["Straße"], ["Brücke", "bridge"]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("sky\nroad, , car\n", "line 2 .* empty name"),
        ("sky\nroad,\n", "line 2 .* empty name"),
        ("# only comments\n\n", "no class names"),
        ("", "no class names"),
        ("sky\nroad\nsky\n", r"'sky' is used in classes 0 and 2"),
    ],
)
def test_read_labels_file_rejects_bad_content(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(OvssError, match=message):
        read_labels_file(path)


def test_read_labels_file_missing_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match=r"missing\.txt' not found"):
        read_labels_file(tmp_path / "missing.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(OvssError, match="not UTF-8"):
        read_labels_file(latin1)


# ----------------------------------------------------------------------------------------------------
# normalize_labels (Python API)


def test_normalize_labels_canonical_form() -> None:
    assert normalize_labels(["sky", "road", ["person", "pedestrian"]]) == [
        ["sky"],
        ["road"],
        ["person", "pedestrian"],
    ]
    assert normalize_labels((" sky ", ("car ", " truck"))) == [["sky"], ["car", "truck"]]


def test_normalize_labels_returns_new_lists() -> None:
    synonyms = ["person", "pedestrian"]
    result = normalize_labels([synonyms])
    result[0].append("human")
    assert synonyms == ["person", "pedestrian"]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([], "empty"),
        ("sky, road", "got the string"),
        ([[]], "class 0 has no names"),
        (["sky", ()], "class 1 has no names"),
        (["sky", ""], "class 1 has an empty name"),
        (["sky", ["car", "  "]], "class 1 has an empty name"),
        ([1, "sky"], r"class 0 is 1 \(int\)"),
        (["sky", None], r"class 1 is None \(NoneType\)"),
        ([["car", 2]], "class 0 contains 2"),
        ([["car", ["truck"]]], "class 0 contains"),
        (["person", "road", ["pedestrian", " person"]], r"'person' is used in classes 0 and 2"),
    ],
)
def test_normalize_labels_rejects_bad_input(labels: Sequence[str | Sequence[str]], message: str) -> None:
    with pytest.raises(OvssError, match=message):
        normalize_labels(labels)


# ----------------------------------------------------------------------------------------------------
# flatten_labels


def test_flatten_labels_hand_example() -> None:
    names, class_of_name = flatten_labels([["sky"], ["person", "pedestrian", "human"], ["road"]])
    assert names == ["sky", "person", "pedestrian", "human", "road"]
    assert class_of_name == [0, 1, 1, 1, 2]


def test_flatten_labels_inverts_grouping() -> None:
    classes = parse_labels("a|b|c, d, e|f")
    names, class_of_name = flatten_labels(classes)
    regrouped: list[list[str]] = [[] for _ in classes]
    for name, class_index in zip(names, class_of_name, strict=True):
        regrouped[class_index].append(name)
    assert regrouped == classes
    assert len(names) == 6


# ----------------------------------------------------------------------------------------------------
# one reader: segment --labels-file, eval --names, the demo's box and the packaged name files

MIXED_FILE = (
    "\ufeff# a class file written by hand\n"
    "background ; sky\n"
    "person|pedestrian   # synonyms with a pipe\n"
    "car, automobile\n"
    "road\n"
)
MIXED_CLASSES = [["background", "sky"], ["person", "pedestrian"], ["car", "automobile"], ["road"]]


def test_segment_and_eval_read_a_class_file_alike(tmp_path: Path) -> None:
    """The file that ``ovss segment --labels-file`` reads gives ``ovss eval --names`` the same classes."""
    from ovss.eval.datasets import FolderDataset
    from ovss.eval.names import read_names_file

    names = tmp_path / "classes.txt"
    names.write_text(MIXED_FILE, encoding="utf-8")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")  # paired by stem; not read when the dataset is opened
    (tmp_path / "masks" / "a.png").write_bytes(b"")
    segment = read_labels_file(names)
    assert segment == MIXED_CLASSES  # byte order mark dropped; ',', '|' and ';' all separate synonyms
    assert read_names_file(names) == segment
    assert FolderDataset(tmp_path / "images", tmp_path / "masks", names).names == segment


def test_the_demo_label_box_round_trips_a_class_file(tmp_path: Path) -> None:
    """``ovss demo --labels-file`` fills the box with text the box parses back into the file's classes."""
    from ovss.demo.session import parse_label_box
    from ovss.labels import format_labels

    names = tmp_path / "classes.txt"
    names.write_text(MIXED_FILE, encoding="utf-8")
    text = format_labels(read_labels_file(names))
    assert text == "background|sky, person|pedestrian, car|automobile, road"
    assert parse_labels(text) == MIXED_CLASSES
    assert parse_label_box(text) == MIXED_CLASSES


def _release_format(text: str) -> list[list[str]]:
    """The SCLIP/NACLIP release files' own rule: one class per line, synonyms separated by ", "."""
    return [[name.strip() for name in line.split(",")] for line in text.splitlines() if line.strip()]


def test_packaged_name_files_read_as_the_release_format() -> None:
    """Every benchmark name file gives the same classes through the one reader as by the release's comma rule."""
    import warnings
    from importlib import resources

    from ovss.eval.names import DATASETS, NAME_SETS, load_names

    folder = resources.files("ovss") / "data" / "names"
    seen = 0
    for dataset in DATASETS:
        for name_set in NAME_SETS:
            per_set = folder / f"{dataset}-{name_set}.txt"
            entry = per_set if per_set.is_file() else folder / f"{dataset}.txt"
            text = entry.read_text(encoding="utf-8")
            assert not any(sep in text for sep in "|;#\ufeff")  # release files: commas only
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # release-format lines of many synonyms do not warn here
                classes = load_names(dataset, name_set)
            assert classes == _release_format(text)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # segment's reader warns about lines of 3+ comma synonyms
                assert read_labels_file(Path(str(entry)), allow_duplicates=True) == classes
            seen += 1
    assert seen == len(DATASETS) * len(NAME_SETS)
    coco = load_names("coco_object", "bg-rename")
    assert "bed" in coco[0] and ["bed"] in coco  # a background synonym that is also a class: allowed here
    with pytest.raises(OvssError, match="'bed' is used in classes 0 and"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_labels_file(Path(str(folder / "coco_object-bg-rename.txt")))  # segment refuses it, naming both
