"""The method registry: a plain dict from name to :class:`MethodSpec` (segment-anything's builder dict).

The registry is metadata only and imports no torch: a built-in method's run function is named by its import
path (:class:`LazyRun`) and imported on first call, so ``ovss methods`` and ``ovss --help`` start fast.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ovss.errors import OvssError

if TYPE_CHECKING:
    import torch

    from ovss.methods.common import Backbones, MethodOutput, WindowBatch
    from ovss.pipeline.maps import FullResolutionMaps, LabelRule

MethodFn = Callable[["Backbones", "WindowBatch", Any], "MethodOutput"]
# (extras, features (L, N, E), text (Q, E), options) -> per-window logits (L, N, Q); see MethodSpec.score
ScoreFn = Callable[[dict[str, Any], "torch.Tensor", "torch.Tensor", Any], "torch.Tensor"]
# (backbones, all windows, the image stage's output, options) -> the output the segmenter keeps; MethodSpec.finish
FinishFn = Callable[["Backbones", "WindowBatch", "MethodOutput", Any], "MethodOutput"]
# (backbones, extras, maps, label rule, options) -> (maps, diagnostics); see MethodSpec.post
PostFn = Callable[["Backbones", dict[str, Any], "FullResolutionMaps", "LabelRule", Any], tuple[Any, dict[str, Any]]]
# (backbones, pipeline config, options, method name) -> None, raising OvssError; see MethodSpec.check
CheckFn = Callable[["Backbones", Any, Any, str], None]

GLA_SUFFIX = "+gla"  # name of GLA attached to a base: "<base>+gla"


@dataclass(frozen=True)
class Geometry:
    """Default test-time geometry of a method for arbitrary images (presets override it per dataset)."""

    short_side: int | None  # resize the short side to this many pixels (None: use the image as given)
    crop: int  # window side c in processing pixels (0: whole image in one pass)
    stride: int  # window stride s in processing pixels


@dataclass(frozen=True)
class LazyRun:
    """A function named by import path, imported on its first call (keeps the registry torch-free).

    Serves every callable of a :class:`MethodSpec`: ``run`` (``MethodFn``) and ``score`` (``ScoreFn``).
    """

    target: str  # "package.module:function"
    args: tuple[Any, ...] = ()  # leading arguments bound to the function (e.g. the base name of X+gla)

    def resolve(self) -> Callable[..., Any]:
        """The function itself (importing its module, and with it torch, on first use)."""
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args: Any) -> Any:
        return self.resolve()(*self.args, *args)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its image stage, text stage and optional steps, and the defaults that come with it.

    Every method is an *image stage* (``run`` over batches of windows, then ``finish`` over all of them: the
    features ``set_image`` keeps) and a *text stage* (``score``: features + text embeddings -> window logits,
    cosine by default), plus an optional ``post`` step on the full-resolution maps. The segmenter runs the same
    code for every method; what differs is data here: the weights it needs, its windowing and these functions.
    """

    name: str  # registry name, e.g. "clearclip"
    run: MethodFn  # image stage: (backbones, windows, options) -> last-block output tokens on the method's grid
    options: Any  # frozen dataclass instance with the method's own options and their defaults
    logit_scale: float  # temperature tau of the name softmax (spec §5.1)
    pad_multiple: int  # windows are zero-padded symmetrically to a multiple of this (1 = no padding)
    geometry: Geometry  # default resize / crop / stride for generic images
    # The models a method needs beyond CLIP, as data: (role, default weights) pairs, e.g. ("vfm", "dino-vitb8"),
    # ("sam", "sam-vitb"). ovss.load, the demo's model pool, ovss bench and ovss download read them.
    weights: tuple[tuple[str, str], ...] = ()
    joint_windows: bool = False  # all windows of an image must be processed in one call (GLA)
    # ``run`` reads more of the image than its windows' pixels (WindowBatch.image / .rgb / .image_size: CASS's
    # global view), so windows of several images never share a run (predict_many(pool_windows=True)).
    reads_image: bool = False
    description: str = ""  # one line for `ovss methods` and the README table
    base: str | None = None  # the method GLA is attached to ("proxyclip" for "proxyclip+gla"); None: none
    windowing: str = "sliding"  # how windows are cut: a key of ovss.pipeline.windows.WINDOWINGS ("canvas": Trident)
    # Image stage over all windows (joint-window methods; Trident's splice + SAM aggregation), after ``run``.
    finish: FinishFn | None = None
    # Post step on the full-resolution maps, after the labels rule (Trident's SAM refinement).
    post: PostFn | None = None
    # Errors that hold for every image, raised when the segmenter is built (Trident: SAM, patch, crop, PAMR).
    check: CheckFn | None = None
    # Image- and text-dependent scoring at predict time (CASS): (MethodOutput.extras, features, text, options)
    # -> (L, N, Q) window logits; None: the plain cosine similarity features @ text.T.
    score: ScoreFn | None = None

    @property
    def roles(self) -> tuple[str, ...]:
        """The model roles the method needs beyond CLIP, e.g. ("vfm", "sam")."""
        return tuple(role for role, _ in self.weights)

    @property
    def pools_images(self) -> bool:
        """Whether windows of several images may share one ``run`` (per-window methods that read only their crops)."""
        return not self.joint_windows and not self.reads_image

    def needs(self, role: str) -> bool:
        """Whether the method needs a model in ``role`` ("vfm", "sam")."""
        return role in self.roles

    def default_weights(self, role: str) -> str:
        """The weights loaded for ``role`` when the caller names none (KeyError: the method has no such role)."""
        return dict(self.weights)[role]


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to :data:`METHODS` (names are unique)."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    if spec.finish is not None and not spec.joint_windows:  # finish sees every window of the image at once
        raise ValueError(f"method {spec.name!r} has a finish step, which needs joint_windows=True")
    METHODS[spec.name] = spec
    return spec


def register_gla(
    base: str,
    geometry: Geometry | None = None,
    pad_multiple: int | None = None,
    *,
    extra: Any = None,
    suffix: str = "",
    description: str | None = None,
) -> MethodSpec:
    """Register a composed method ``<base>+gla<suffix>``: GLA's cross-window attention on a registered base
    (spec §4.8, §4.9), with an optional option part of its own (``scclip+gla``, ``proxyclip+gla+mlf``: §4.11).

    The composed method keeps everything of the base's spec (logit scale, padding, weights it needs, image
    path, predict-time ``score``; spec §5.1) except what is named here. Its options are
    :class:`~ovss.methods.options.ComposedOptions`: the base's, GLA's (keywords ``gla_<name>``) and ``extra``
    (keywords with its class's ``keyword_prefix``). The method needs an adapter under its name in
    ``ovss.methods.composed.bases.ADAPTERS``.

    Args:
        base: a registered method.
        geometry: the default geometry (None: the base's).
        pad_multiple: padding multiple when the adapter's keys need another one (None: the base's).
        extra: the variant's own options dataclass (with a ``keyword_prefix``), or None.
        suffix: appended to ``<base>+gla`` to name a variant (``"+mlf"``).
        description: one line for ``ovss methods`` (None: GLA on the base).
    """
    import dataclasses

    from ovss.gla.config import GLAConfig
    from ovss.methods.options import ComposedOptions

    spec = METHODS[base]
    name = base + GLA_SUFFIX + suffix
    return register(
        dataclasses.replace(
            spec,
            name=name,
            run=LazyRun("ovss.methods.composed.method:run_composed", (name,)),
            options=ComposedOptions(spec.options, GLAConfig(), extra),
            pad_multiple=pad_multiple or spec.pad_multiple,
            geometry=geometry or spec.geometry,
            joint_windows=True,
            description=description or f"GLA (cross-window proxy attention, dynamic normalisation) on {base}",
            base=base,
        )
    )


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; unknown names raise an :class:`OvssError` listing close matches."""
    _ensure_builtin_methods()
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise OvssError(f"unknown method {name!r}.{hint} Available: {', '.join(available_methods())}")
    return METHODS[name]


def with_gla(name: str, gla: bool = True) -> MethodSpec:
    """The method ``name``, with GLA attached when ``gla`` (``with_gla("proxyclip")`` is ``proxyclip+gla``).

    Raises:
        OvssError: unknown method, or GLA is not available for it.
    """
    spec = get_method(name)
    if not gla or spec.base is not None:
        return spec
    if spec.name + GLA_SUFFIX not in METHODS:
        bases = sorted(s.base for s in METHODS.values() if s.base is not None)
        raise OvssError(f"GLA is not available for {spec.name!r}; it attaches to {', '.join(bases)}")
    return METHODS[spec.name + GLA_SUFFIX]


def needed_weights(methods: Iterable[str], given: Mapping[str, Any] | None = None) -> list[str]:
    """Registry names of the weights ``methods`` load by default: CLIP's, and each role's that is not ``given``.

    Args:
        methods: method names.
        given: role ("clip", "vfm", "sam") -> what the caller passes instead (a falsy value: the default).
    """
    from ovss.storage.weights import DEFAULT_CLIP

    given = given or {}
    names = [] if given.get("clip") else [DEFAULT_CLIP]
    for method in methods:
        names += [default for role, default in get_method(method).weights if not given.get(role)]
    return list(dict.fromkeys(names))


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _ensure_builtin_methods()
    return sorted(METHODS)


def _ensure_builtin_methods() -> None:
    # Importing the catalogue registers the built-in methods (torch-free: run functions load lazily).
    import ovss.methods.builtin  # noqa: F401
