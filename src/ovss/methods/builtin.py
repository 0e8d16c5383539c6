"""Import the built-in methods so that they register themselves (bases first, then GLA on top of them)."""

from ovss.methods import clearclip, gclip, maskclip, naclip, proxyclip, sclip, vanilla  # noqa: F401

# isort: split
from ovss.gla import method  # noqa: F401
