"""User-given class lists: parse, read from a file, validate and flatten into text-encoder names.

A class list is a list of classes in label order; each class is a list of one or more names (synonyms).
A pixel gets the class of its best-scoring name. Names are kept verbatim (only surrounding whitespace is
stripped): ``trafficlight`` and ``traffic light`` are different queries to the text encoder.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from ovss.errors import OvssError

# Separators of synonyms on one line of a labels file: "," (the SCLIP/NACLIP release files), "|" or ";".
_FILE_SYNONYM_SEPARATORS = re.compile(r"[,|;]")
# A labels-file line of at least this many comma-separated names (and no "|" or ";") is probably a list of
# different classes written on one line ("sky, road, car"), not synonyms: read_labels_file warns.
COMMA_LIST_WARNING_PARTS = 3
UNLABELLED = -1  # label of a pixel left to no class (below the background threshold without a background class)
BACKGROUND_NAME = "background"  # a class with this name (any synonym, any case) receives uncertain pixels


def normalize_labels(
    labels: Sequence[str | Sequence[str]], allow_duplicates: bool = False
) -> list[list[str]]:
    """Validate a class list given through the Python API and bring it to the canonical form.

    Example: ``['sky', 'road', ['person', 'pedestrian']]`` -> ``[['sky'], ['road'], ['person',
    'pedestrian']]``.

    Args:
        labels: one entry per class in label order; an entry is a name or a sequence of synonyms.
        allow_duplicates: accept a name used by two classes (or twice in one class). Off for user input;
            needed for the reference COCO-Object name sets, whose background synonyms include ``bed``,
            which is also a class of its own.

    Returns:
        One list of names (length >= 1) per class, names stripped of surrounding whitespace.

    Raises:
        OvssError: ``labels`` is a string or empty; a class is empty; a name is empty or not a string;
            a name is used twice (unless ``allow_duplicates``).
    """
    if isinstance(labels, str):
        raise OvssError(
            f"labels must be a list of class names, got the string {labels!r}; "
            "pass ['a', 'b'] or use parse_labels('a, b')"
        )
    if not isinstance(labels, Sequence):
        raise OvssError(f"labels must be a list of class names, got a {type(labels).__name__}")
    if len(labels) == 0:
        raise OvssError("the list of labels is empty; give at least one class name")
    classes: list[list[str]] = []
    first_use: dict[str, int] = {}  # name -> index of the class that used it first
    for class_index, entry in enumerate(labels):
        if isinstance(entry, str):
            raw_names: Sequence[object] = [entry]
        elif isinstance(entry, Sequence):
            raw_names = entry
        else:
            raise OvssError(
                f"class {class_index} is {entry!r} ({type(entry).__name__}); each class must be a name or "
                "a list of synonym names (strings)"
            )
        if len(raw_names) == 0:
            raise OvssError(f"class {class_index} has no names; give at least one name or remove it")
        names: list[str] = []
        for raw_name in raw_names:
            if not isinstance(raw_name, str):
                raise OvssError(
                    f"class {class_index} contains {raw_name!r} ({type(raw_name).__name__}); "
                    "class names must be strings"
                )
            name = raw_name.strip()
            if not name:
                raise OvssError(f"class {class_index} has an empty name; remove it or give a name")
            if name in first_use and not allow_duplicates:
                where = (
                    f"twice in class {class_index}"
                    if first_use[name] == class_index
                    else f"in classes {first_use[name]} and {class_index}"
                )
                raise OvssError(
                    f"label name {name!r} is used {where} (counted from 0); each name may appear "
                    "once — remove one"
                )
            first_use.setdefault(name, class_index)
            names.append(name)
        classes.append(names)
    return classes


def parse_labels(text: str, allow_duplicates: bool = False) -> list[list[str]]:
    """Parse the command line's ``--labels`` text: classes separated by ``,``, synonyms by ``|``.

    Example: ``"sky, road, person|pedestrian"`` -> ``[['sky'], ['road'], ['person', 'pedestrian']]``.

    Args:
        text: the option's value.
        allow_duplicates: see ``normalize_labels``.

    Returns:
        One list of names per class, in the given order.

    Raises:
        OvssError: no class, an empty class (e.g. ``"a,,b"`` or a trailing comma), an empty synonym
            (``"a|"``) or a duplicate name.
    """
    if not text.strip():
        raise OvssError("--labels is empty; give class names separated by commas, e.g. 'sky, road, car'")
    classes: list[list[str]] = []
    for class_index, class_text in enumerate(text.split(",")):
        if not class_text.strip():
            raise OvssError(
                f"class {class_index} of --labels {text!r} is empty (two commas in a row or a trailing "
                "comma); remove the extra comma"
            )
        names = [name.strip() for name in class_text.split("|")]
        if not all(names):
            raise OvssError(
                f"class {class_index} of --labels {text!r} has an empty synonym (a stray '|'); remove it"
            )
        classes.append(names)
    return normalize_labels(classes, allow_duplicates=allow_duplicates)


def parse_labels_text(
    text: str, source: str, allow_duplicates: bool = False, warn_comma_lists: bool = True
) -> list[list[str]]:
    """Parse the content of a labels file: one class per line, in label order.

    The one reader of class files: ``ovss segment --labels-file``, ``ovss demo --labels-file``, ``ovss eval
    --names`` and the benchmarks' packaged name files all come through here, so one file means one class list
    everywhere. Synonyms on a line are separated by ``,`` (as in the SCLIP/NACLIP release name files), ``|``
    or ``;``. Everything after ``#`` is a comment; lines that are blank after removing comments are skipped.
    A leading byte order mark is dropped.

    Args:
        text: the file's content.
        source: what to call the text in messages (``labels file 'classes.txt'``).
        allow_duplicates: see ``normalize_labels``.
        warn_comma_lists: a line of three or more comma-separated names without ``|`` or ``;``
            (``sky, road, car``) is read as one class with synonyms, as in the release files, but raises a
            ``UserWarning`` (a user likely meant several classes); write synonyms with ``|`` to silence it.
            False for files known to be in the release format (``ovss eval --names``, packaged names).

    Returns:
        One list of names per class, in file order.

    Raises:
        OvssError: a line with an empty name; no class; a duplicate name (unless ``allow_duplicates``).
    """
    classes: list[list[str]] = []
    for line_number, raw_line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        names = [name.strip() for name in _FILE_SYNONYM_SEPARATORS.split(line)]
        if not all(names):
            raise OvssError(
                f"line {line_number} of {source} has an empty name ({raw_line.strip()!r}); "
                "remove the stray separator"
            )
        if warn_comma_lists and len(names) >= COMMA_LIST_WARNING_PARTS and not re.search(r"[|;]", line):
            warnings.warn(
                f"line {line_number} of {source} ({line!r}) is one class with {len(names)} "
                "synonyms; if these are different classes put one per line (write synonyms as 'a | b' to "
                "silence this warning)",
                UserWarning,
                stacklevel=3,
            )
        classes.append(names)
    if not classes:
        raise OvssError(f"{source} contains no class names; write one class per line")
    return normalize_labels(classes, allow_duplicates=allow_duplicates)


def read_labels_file(
    path: str | os.PathLike[str], allow_duplicates: bool = False, warn_comma_lists: bool = True
) -> list[list[str]]:
    """Read a class list from a UTF-8 text file (format: :func:`parse_labels_text`).

    Args:
        path: the text file.
        allow_duplicates: see ``normalize_labels``.
        warn_comma_lists: see :func:`parse_labels_text`.

    Returns:
        One list of names per class, in file order.

    Raises:
        OvssError: missing or non-UTF-8 file; a line with an empty name; no class; a duplicate name.
    """
    file_path = Path(path)
    source = f"labels file '{file_path}'"
    try:
        text = file_path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise OvssError(f"{source} not found; check the path") from error
    except IsADirectoryError as error:
        raise OvssError(f"{source} is a folder; give a text file with one class per line") from error
    except UnicodeDecodeError as error:
        raise OvssError(f"{source} is not UTF-8 text; save it as UTF-8") from error
    except OSError as error:
        raise OvssError(f"cannot read {source}: {error.strerror}") from error
    return parse_labels_text(text, source, allow_duplicates=allow_duplicates, warn_comma_lists=warn_comma_lists)


def format_labels(classes: Sequence[Sequence[str]]) -> str:
    """The ``--labels`` text of a class list: classes joined by ``", "``, synonyms by ``"|"``.

    ``parse_labels(format_labels(c)) == c`` for every class list read from a file (a name read from a file
    holds no ``,`` or ``|``, which are separators there).
    """
    return ", ".join("|".join(synonyms) for synonyms in classes)


def flatten_labels(classes: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """Flatten a class list into the names fed to the text encoder and the class of each name.

    Example: ``[['sky'], ['person', 'pedestrian']]`` -> ``(['sky', 'person', 'pedestrian'], [0, 1, 1])``.

    Args:
        classes: canonical class list (output of ``normalize_labels`` and friends), K classes.

    Returns:
        (names, class_of_name): the Q names in order, and for each name its class index in [0, K).
    """
    names: list[str] = []
    class_of_name: list[int] = []
    for class_index, synonyms in enumerate(classes):
        for name in synonyms:
            names.append(name)
            class_of_name.append(class_index)
    return names, class_of_name


def check_background(background: int | None, num_classes: int) -> None:
    """``predict``'s ``background``: a class index in 0..C-1, or None (uncertain pixels stay unlabelled).

    Raises:
        OvssError: anything else.
    """
    if background is not None and not 0 <= background < num_classes:
        raise OvssError(f"background must be a class index in 0..{num_classes - 1} or None, got {background}")


def background_class(classes: Sequence[Sequence[str]], name: str | None = None) -> int | None:
    """The class that receives pixels below the background threshold, or None (they stay unlabelled).

    Args:
        classes: canonical class list.
        name: a name (any synonym) of the chosen class; None: the class with a name ``background``
            (compared without case), if any.

    Returns:
        The class index, or None when ``name`` is None and no class is named ``background``.

    Raises:
        OvssError: ``name`` is not a name of any class.
    """
    wanted = BACKGROUND_NAME if name is None else name.strip()
    for class_index, synonyms in enumerate(classes):
        if any(synonym.casefold() == wanted.casefold() for synonym in synonyms):
            return class_index
    if name is None:
        return None
    listing = ", ".join(synonyms[0] for synonyms in classes)
    raise OvssError(f"background class {name!r} is not one of the labels ({listing}); add it or fix the name")
