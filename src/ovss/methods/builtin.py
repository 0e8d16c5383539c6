"""Import the built-in methods so that they register themselves."""

from ovss.methods import clearclip, maskclip, naclip, sclip, vanilla  # noqa: F401
