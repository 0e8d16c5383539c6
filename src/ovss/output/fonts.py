"""Fonts for the legends drawn into overlays: names in any script, found through fontconfig.

The legend's main font is fontconfig's ``sans-serif`` (``fc-match``). A character it lacks (``é`` in a
font without it, 日本, emoji...) is drawn with the font fontconfig names for that character
(``fc-match "sans-serif:charset=<hex>"``), checked against that font's character set. Where fontconfig is
missing or names no usable font, Pillow's built-in font is used and one warning says which characters it
may draw as boxes and how to fix it (install fontconfig and fonts, e.g. Debian's ``fonts-noto-core``,
``fonts-noto-cjk``, ``fonts-symbola``). No font file ships with ovss.
"""

from __future__ import annotations

import bisect
import functools
import shutil
import subprocess
import warnings
from dataclasses import dataclass

from PIL import ImageDraw, ImageFont

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
FAMILY = "sans-serif"  # fontconfig pattern of the legend's main font
_FORMAT = "%{file}\t%{index}\t%{charset}"  # fc-match output: one font file, its face index, its characters
_warned: set[str] = set()  # warnings already given (each once per process)


@dataclass(frozen=True)
class Face:
    """A font face fontconfig named: the file, the face index in it, the characters it has."""

    file: str
    index: int
    ranges: tuple[tuple[int, int], ...]  # sorted, inclusive code point ranges

    def covers(self, codepoint: int) -> bool:
        """Whether the face has a glyph for ``codepoint``."""
        at = bisect.bisect_right(self.ranges, (codepoint, 0x10FFFF + 1)) - 1
        return at >= 0 and self.ranges[at][0] <= codepoint <= self.ranges[at][1]


def _parse_charset(text: str) -> tuple[tuple[int, int], ...]:
    """fontconfig's charset text ("20-7e a0-17f 391") as sorted inclusive (low, high) ranges."""
    ranges = []
    for part in text.split():
        low, _, high = part.partition("-")
        ranges.append((int(low, 16), int(high or low, 16)))
    return tuple(sorted(ranges))


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


@functools.lru_cache(maxsize=256)
def _fc_match(pattern: str) -> Face | None:
    """The face fontconfig picks for ``pattern``; None without fontconfig or when it names none."""
    program = shutil.which("fc-match")
    if program is None:
        return None
    try:
        done = subprocess.run(
            [program, f"--format={_FORMAT}", pattern], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    fields = done.stdout.split("\t")
    if done.returncode != 0 or len(fields) != 3 or not fields[0]:
        return None
    try:
        return Face(fields[0], int(fields[1] or 0), _parse_charset(fields[2]))
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def _load(face: Face, size: int) -> ImageFont.FreeTypeFont | None:
    """The face at ``size`` pixels; None when Pillow cannot draw it at that size (e.g. bitmap colour emoji)."""
    try:
        return ImageFont.truetype(face.file, size, index=face.index)
    except (OSError, ValueError):
        return None


def _builtin(size: int) -> Font:
    """Pillow's built-in font at ``size`` pixels (its fixed-size bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):
        return ImageFont.load_default()


class LegendFont:
    """Measure and draw legend text at one size, each character with a font that has it.

    Args:
        size: text height in pixels.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        main = _fc_match(FAMILY)
        self._main = main if main is not None and _load(main, size) is not None else None
        if self._main is None:
            _warn_once(
                "no-fontconfig",
                "ovss: no font found through fontconfig (fc-match); legends use Pillow's built-in font, which "
                "draws letters outside basic Latin as boxes. Install fontconfig and fonts (Debian: "
                "fonts-noto-core fonts-noto-cjk fonts-symbola) to draw names in any script.",
            )
        self._faces: list[Face] = [] if self._main is None else [self._main]  # main first, then fallbacks found
        self._builtin_font = _builtin(size) if self._main is None else None
        ascent, descent = self._metrics(self._primary())
        self.ascent = ascent
        self.line_height = max(ascent + descent, 1)  # pixels from a row's top to its lowest descender

    def _primary(self) -> Font:
        if self._main is None:
            assert self._builtin_font is not None
            return self._builtin_font
        font = _load(self._main, self.size)
        assert font is not None
        return font

    @staticmethod
    def _metrics(font: Font) -> tuple[int, int]:
        if isinstance(font, ImageFont.FreeTypeFont):
            ascent, descent = font.getmetrics()
            return int(ascent), int(descent)
        return int(font.getbbox("Ag")[3]), 0

    def _face_for(self, char: str) -> Face | None:
        """The face that draws ``char``: the main one if it has it, else fontconfig's pick for it."""
        codepoint = ord(char)
        for face in self._faces:
            if face.covers(codepoint):
                return face
        if self._main is None or char.isspace():
            return self._main
        found = _fc_match(f"{FAMILY}:charset={codepoint:x}")
        if found is not None and found.covers(codepoint) and _load(found, self.size) is not None:
            self._faces.append(found)
            return found
        _warn_once(
            f"glyph-{codepoint:x}",
            f"ovss: no installed font has the character {char!r} (U+{codepoint:04X}); the legend draws it as a "
            "box. Install a font that has it (Debian: fonts-noto-core fonts-noto-cjk fonts-symbola).",
        )
        return self._main

    def runs(self, text: str) -> list[tuple[Font, str]]:
        """``text`` cut into pieces drawn with one font each, in order."""
        pieces: list[tuple[Face | None, str]] = []
        for char in text:
            face = self._face_for(char)
            if pieces and pieces[-1][0] == face:
                pieces[-1] = (face, pieces[-1][1] + char)
            else:
                pieces.append((face, char))
        return [(self._primary() if face is None else self._font(face), piece) for face, piece in pieces]

    def _font(self, face: Face) -> Font:
        font = _load(face, self.size)
        return self._primary() if font is None else font

    def width(self, text: str) -> int:
        """Width of ``text`` in pixels."""
        return int(sum(font.getlength(piece) for font, piece in self.runs(text)) + 0.999)

    def shorten(self, text: str, limit: int) -> str:
        """``text`` if it is at most ``limit`` pixels wide, else its longest start that fits with "…" added."""
        if self.width(text) <= limit:
            return text
        low, high = 0, len(text)  # the longest prefix with the ellipsis that fits: binary search
        while low < high:
            middle = (low + high + 1) // 2
            if self.width(text[:middle].rstrip() + "…") <= limit:
                low = middle
            else:
                high = middle - 1
        return text[:low].rstrip() + "…"

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill: tuple[int, int, int]) -> None:
        """Draw ``text`` with its row's top-left corner at ``xy``; every piece sits on the main font's baseline."""
        left, top = xy
        x = float(left)
        baseline = top + self.ascent
        for font, piece in self.runs(text):
            if isinstance(font, ImageFont.FreeTypeFont):
                draw.text((x, baseline), piece, fill=fill, font=font, anchor="ls")
            else:
                draw.text((x, top), piece, fill=fill, font=font)
            x += font.getlength(piece)
