"""The page's image input: Gradio keeps the uploaded file; ovss decodes it, so a bad file is ovss's one line.

Gradio's own ``gr.Image`` opens every upload with Pillow before the handler runs; a corrupt, truncated or
unsupported file then fails inside Gradio, and the page shows Gradio's internals (handler names, input
components, the server's temporary paths). :func:`photo_input` is the same component on the page, but hands
the handler an :class:`Upload` (the server's copy and the user's file name) and ``read_upload`` decodes it
with :func:`ovss.pipeline.image.read_image`, as ``ovss segment`` reads a file.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import numpy.typing as npt

from ovss.errors import OvssError


@dataclass(frozen=True)
class Upload:
    """An uploaded file, not decoded yet."""

    path: str  # the server's copy
    name: str  # the name the user's file had (what error messages show)


def photo_input(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` (``kwargs`` as its own) whose value reaches the handler undecoded, as an :class:`Upload`.

    Only this instance's ``preprocess`` is replaced (a subclass would make Gradio write a ``.pyi`` stub
    next to this file); the page draws it with Gradio's image component as usual.
    """
    image = gr.Image(**kwargs)
    vars(image)["preprocess"] = _undecoded  # Gradio calls block.preprocess(payload) on this instance
    return image


def _undecoded(payload: Any) -> Upload | None:
    """The uploaded file as an :class:`Upload` (None when there is none); nothing is decoded here."""
    if payload is None:
        return None
    url = getattr(payload, "url", None)
    if url and url.startswith("data:"):  # a pasted image sent inline
        return Upload(_data_url_file(url), "the pasted image")
    if payload.path is None:
        return None
    name = Path(payload.orig_name).name if payload.orig_name else "the uploaded image"
    return Upload(str(payload.path), name)


def _data_url_file(url: str) -> str:
    """Write the bytes of a ``data:...;base64,`` URL to a temporary file and return its path."""
    try:
        data = base64.b64decode(url.partition(",")[2], validate=False)
    except (binascii.Error, ValueError):
        data = b""  # read_image then says the file is not an image
    with tempfile.NamedTemporaryFile(prefix="ovss-paste-", delete=False) as file:
        file.write(data)
    return file.name


def read_upload(image: Any) -> npt.NDArray[np.uint8] | Any:
    """An :class:`Upload` decoded to a read-only (H, W, 3) uint8 RGB array with ovss's reader; anything else is
    returned as is.

    Raises:
        OvssError: the file is corrupt, truncated or not an image; the message names the user's file, not
            the server's copy.
    """
    if not isinstance(image, Upload):
        return image
    from ovss.pipeline.image import read_image

    try:
        rgb = read_image(image.path)
    except OvssError as err:
        message = str(err).replace(f"'{image.path}'", f"'{image.name}'").replace(image.path, image.name)
        raise OvssError(message) from None
    rgb.flags.writeable = False  # read-only: the session and every method's image state share it, uncopied
    return rgb
