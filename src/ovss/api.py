"""``ovss.load``: build a :class:`Segmenter` from a method name, CLIP weights, pipeline settings and options."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ovss.config import PIPELINE_KEYS, pipeline_config
from ovss.errors import OvssError
from ovss.methods.options import resolve_options
from ovss.methods.registry import MethodSpec, with_gla
from ovss.models.clip import CLIP, build_clip
from ovss.models.vit import VisionTransformer
from ovss.precision import store_reduced
from ovss.predictor import Segmenter
from ovss.storage.hf_hub import is_hub_id, resolve_hub
from ovss.storage.hf_hub import offline_reason as hub_offline_reason
from ovss.text.tokenizer import Tokenizer, resolve_tokenizer
from ovss.tuning import Tuning, resolve_tuning

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a dtype or one of fp32 / bf16 / fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise OvssError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return DTYPES[dtype]


def check_device(device: torch.device | str) -> torch.device:
    """The torch device named by ``device``; OvssError when it is malformed or not usable here (e.g. no CUDA)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise OvssError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise OvssError(
                f"device {str(device)!r} needs CUDA, which this PyTorch {torch.__version__} does not see "
                "(no GPU, driver or CUDA build); use device 'cpu' (--device cpu)"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise OvssError(
                f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible; "
                "use cuda:0 .. cuda:N-1"
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise OvssError(f"device {str(device)!r} (Apple MPS) is not available here; use device 'cpu' (--device cpu)")
    return resolved


def load_clip(
    clip: str | os.PathLike[str] | CLIP = "ViT-B/16",
    *,
    act: str | None = None,
    download: bool = True,
    token: str | None = None,
) -> tuple[CLIP, dict[str, Any]]:
    """Load CLIP weights by registry name, Hub id or local file/folder (OpenAI .pt, OpenCLIP, Hugging Face).

    What the tensors cannot say comes from the registry entry of a named checkpoint, else from the configs
    beside a local file (see :func:`ovss.models.formats.load_clip_state_dict`): the MLP activation, the
    attention heads of each tower (default width // 64) and the RGB input statistics (default OpenAI's).

    Args:
        clip: a name from :func:`ovss.available_models`, a Hub id ``hf-hub:ORG/NAME[@REVISION]``, a local weight
            file or HF folder, or a built model.
        act: MLP activation override ("quick_gelu" or "gelu"); default from the file or the registry entry.
        download: allow downloading registry or Hub weights that are not cached.
        token: Hugging Face access token for a gated or private Hub repository (default: HF_TOKEN or the
            ``hf auth login`` token, read by huggingface_hub).

    Returns:
        The model (CPU, fp32, eval) and a record of where it came from (name, path, format, activation,
        heads, input statistics and the config files read).
    """
    if isinstance(clip, CLIP):
        return clip, {"clip": "<in-memory model>", "clip_input_norm": clip.input_norm.record()}
    from ovss.models.formats import load_clip_state_dict
    from ovss.models.normalization import InputNorm
    from ovss.storage import hub

    name = str(clip)
    hub_weights = resolve_hub(name, "clip", download=download, token=token) if is_hub_id(name) else None
    path = hub_weights.folder if hub_weights is not None else hub.resolve(name, kind="clip", download=download)
    state_dict, info = load_clip_state_dict(path)
    entry = hub.REGISTRY.get(name)
    chosen = act or info.act or (entry.act if entry is not None else None) or "quick_gelu"
    if chosen not in ("quick_gelu", "gelu"):
        raise OvssError(f"unknown activation {chosen!r}; use quick_gelu or gelu")
    vision_heads, text_heads = info.vision_heads, info.text_heads
    norm = info.input_norm or InputNorm()
    if entry is not None and entry.kind == "clip":
        if entry.heads is not None:
            vision_heads, text_heads = entry.heads
        if entry.mean is not None and entry.std is not None:
            norm = InputNorm(entry.mean, entry.std, f"registry entry '{entry.name}'")
    model = build_clip(
        state_dict,
        act=chosen,
        vision_heads=vision_heads,
        text_heads=text_heads if info.has_text else None,
        input_norm=norm,
        source=str(path),
    )
    record = {
        "clip": name,
        "clip_path": str(Path(path)),
        "clip_format": info.format,
        "clip_act": chosen,
        "clip_heads": [model.visual.cfg.heads, None if model.text is None else model.text.cfg.heads],
        "clip_input_norm": norm.record(),
        "clip_configs": list(info.configs),
    }
    if entry is not None and entry.sha256:
        record["clip_sha256"] = entry.sha256
    if hub_weights is not None:  # the commit the revision resolved to and the weights file's SHA-256
        record.update(hub_weights.record("clip"))
    return model, record


def load_sam_weights(sam: str | os.PathLike[str], download: bool) -> tuple[Any, dict[str, Any]]:
    """Load SAM for SAM-based methods (Trident): a registry name or a local official / Hugging Face checkpoint."""
    from ovss.models.sam import load_sam
    from ovss.storage import hub

    name = str(sam)
    model = load_sam(name, download=download)
    return model, {"sam": name, "sam_path": str(hub.resolve(name, kind="sam", download=False, progress=False))}


def load_vfm(vfm: str | os.PathLike[str], download: bool) -> tuple[Any, dict[str, Any]]:
    """Load the vision foundation model of a DINO-guided method: a registry name or a local checkpoint."""
    from ovss.models.dino import load_vfm as load_vfm_weights
    from ovss.models.dino import position_record

    model, rec = load_vfm_weights(str(vfm), download=download)
    record = {"vfm": rec.get("name"), "vfm_path": rec.get("path"), "vfm_format": rec.get("format")}
    return model, {**record, "vfm_heads": model.cfg.heads, "vfm_positions": position_record(model)}


def _in_memory_record(role: str, model: Any) -> dict[str, Any]:
    """The record of a model passed in built (no file was read)."""
    record: dict[str, Any] = {role: "<in-memory model>"}
    if role == "vfm":
        from ovss.models.dino import position_record

        record["vfm_positions"] = position_record(model)
    return record


# role -> loader(weights name or path, download) -> (model, record); the roles of MethodSpec.weights
ROLE_LOADERS: dict[str, Callable[[str | os.PathLike[str], bool], tuple[Any, dict[str, Any]]]] = {
    "vfm": load_vfm,
    "sam": load_sam_weights,
}


def load_role_models(
    spec: MethodSpec,
    given: Mapping[str, Any],
    download: bool,
    device: torch.device | str,
    token: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The models a method needs beyond CLIP (``spec.weights``), each given or its default, on ``device``.

    Args:
        spec: the method.
        given: role -> what the caller passed (None: the method's default weights; a name, Hub id or path; a
            built model). A Hub id is fetched here and its snapshot folder read by the role's loader.
        token: Hugging Face access token for Hub ids (None: huggingface_hub's own).

    Returns:
        role -> model, and the merged record of where each came from.
    """
    models: dict[str, Any] = {}
    record: dict[str, Any] = {}
    for role, default in spec.weights:
        source = given.get(role)
        if isinstance(source, torch.nn.Module):
            model, rec = source, _in_memory_record(role, source)
        elif is_hub_id(source):
            hub_weights = resolve_hub(source, role, download=download, token=token)
            model, rec = ROLE_LOADERS[role](str(hub_weights.folder), download)
            rec.update(hub_weights.record(role))
        else:
            model, rec = ROLE_LOADERS[role](source if source is not None else default, download)
        models[role] = model.to(device=device)
        record.update(rec)
    return models, record


def wanted_files(spec: MethodSpec, clip: Any, given: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(weights name or path, role) of every file ``load`` would read: CLIP's and each role's, given or default."""
    wanted = [] if isinstance(clip, CLIP) else [(str(clip), "clip")]
    for role, default in spec.weights:
        source = given.get(role)
        if not isinstance(source, torch.nn.Module):
            wanted.append((str(source if source is not None else default), role))
    return wanted


def check_hub_cached(wanted: list[tuple[str, str]], download: bool) -> None:
    """When nothing may be fetched: every ``hf-hub:`` id of ``wanted`` missing from the cache, named before loading.

    Raises:
        OvssError: the cache lookup's one line for each missing repository, joined.
    """
    if hub_offline_reason(download) is None:
        return
    problems = []
    for name, kind in wanted:
        if is_hub_id(name):
            try:
                resolve_hub(name, kind, download=download, progress=False)  # the cache only: no network
            except OvssError as err:
                problems.append(str(err))
    if problems:
        raise OvssError(" Also: ".join(problems))


def load(
    method: str = "clearclip",
    clip: str | os.PathLike[str] | CLIP = "ViT-B/16",
    *,
    vfm: str | os.PathLike[str] | VisionTransformer | None = None,
    sam: Any = None,
    gla: bool | Mapping[str, Any] = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokenizer: str | os.PathLike[str] | Tokenizer | Literal[False] | None = None,
    act: str | None = None,
    download: bool = True,
    tuning: Tuning | Mapping[str, Any] | None = None,
    token: str | None = None,
    **settings: Any,
) -> Segmenter:
    """Build a segmenter.

    Args:
        method: a name from :func:`ovss.available_methods` (e.g. "clearclip", "naclip", "proxyclip+gla").
        clip: CLIP weights: a registry name (default "ViT-B/16", downloaded and checksummed on first use),
            a Hugging Face Hub id (``"hf-hub:openai/clip-vit-base-patch16"``, optionally ``@REVISION``: a
            branch, tag or commit), a local file in any supported format, or a built
            :class:`~ovss.models.clip.CLIP`. Hub ids are fetched into the Hugging Face cache.
        vfm: the vision foundation model of DINO-guided methods (default "dino-vitb8"): a registry name,
            a Hub id (``"hf-hub:facebook/dinov3-vitb16-pretrain-lvd1689m"``), a local DINO / DINOv2 / DINOv3 /
            Hugging Face checkpoint, or a built ViT. Ignored by CLIP-only methods.
            Trident's default is "dino-vitb16".
        sam: SAM weights of SAM-based methods (``trident``; default "sam-vitb"): a registry name, a Hub id
            (``"hf-hub:facebook/sam-vit-base"``), a local official checkpoint, or a built SAM model. Ignored by
            the other methods.
        gla: attach GLA to the method (``load("proxyclip", gla=True)`` equals ``load("proxyclip+gla")``);
            a dict attaches GLA with these GLA options (``gla={"rho": 0.55}`` equals ``gla_rho=0.55``).
        device: where to run (default CPU). Nothing is moved behind your back.
        dtype: backbone precision: torch.float32 (default), or torch.bfloat16 / torch.float16 ("bf16", "fp16")
            to autocast the backbones' matrix products (the image backbones read from files here keep their
            blocks' product weights in that dtype only, :attr:`~ovss.tuning.Tuning.reduced_weights`); norms and
            the residual stream stay fp32, and similarities, proxies, normalisation, softmax and merging always
            run in fp32.
        tokenizer: BPE vocabulary file or HF tokenizer folder; default: a Hugging Face CLIP folder's own
            ``vocab.json`` + ``merges.txt``, else ``OVSS_BPE_PATH``, else downloaded once and cached. It is
            found and checked by its file names here, so a missing vocabulary fails at load, not at the first
            prediction; it is parsed when a name first misses the text cache (a corrupt file fails then).
            ``False``: no tokenizer, for callers who pass ``text_embeddings=`` to every ``predict``; nothing
            is looked for, and a ``predict`` (or ``encode_names``) without ``text_embeddings`` fails.
        act: override the MLP activation ("quick_gelu" / "gelu") for checkpoints that do not say.
        download: allow downloading weights that are not cached.
        token: Hugging Face access token for gated or private Hub repositories (default: HF_TOKEN or the
            ``hf auth login`` token, which huggingface_hub reads itself). Never recorded.
        tuning: speed / memory switches (:class:`~ovss.tuning.Tuning`, or a dict of its fields; default
            ``Tuning()``); none changes results beyond floating-point rounding. Recorded in ``config``.
        **settings: pipeline settings and method options, checked against their declared types.
            Pipeline settings are the fields of :class:`~ovss.config.PipelineConfig` (unset: the method's
            default): short_side (None keeps the image size), crop (0: whole image), stride, logit_scale,
            bg_threshold, area_threshold, pamr_steps, pamr_dilations, templates, max_long_side, window_batch.
            Method options are listed by ``ovss methods``, e.g. ``sigma=5.0`` for naclip; GLA's carry the
            prefix ``gla_`` (``load("proxyclip+gla", beta=1.5, gla_rho=0.55)``: ProxyCLIP's beta, GLA's rho).

    Returns:
        A :class:`Segmenter`.

    Raises:
        OvssError: unknown method, setting or option, a value of the wrong type or out of range, or weights
            that cannot be loaded. Settings and options are checked before any weights are read.
    """
    check_device(device)
    if tokenizer is True:
        raise OvssError("tokenizer=True is not a tokenizer; give a vocabulary path, None (the default) or False (none)")
    tuned = resolve_tuning(tuning)
    spec = with_gla(method, isinstance(gla, Mapping) or bool(gla))
    options = {key: value for key, value in settings.items() if key not in PIPELINE_KEYS}
    if isinstance(gla, Mapping):
        given = {f"gla_{key}": value for key, value in gla.items()}
        twice = sorted(set(given) & set(options))
        if twice:
            raise OvssError(f"{', '.join(twice)} given both as a keyword and in gla={{...}}; give each once")
        options.update(given)
    opts = resolve_options(spec.name, spec.options, options, also=PIPELINE_KEYS)
    config = pipeline_config(spec, {key: value for key, value in settings.items() if key in PIPELINE_KEYS})
    torch_dtype = resolve_dtype(dtype)
    from ovss.storage import hub

    given = {"vfm": vfm, "sam": sam}
    wanted = wanted_files(spec, clip, given)
    hub.check_offline(wanted, download=download, vocabulary=tokenizer is None)  # registry files, all at once
    check_hub_cached(wanted, download)
    model, record = load_clip(clip, act=act, download=download, token=token)
    if model.text is not None and tokenizer is not False and not isinstance(tokenizer, Tokenizer):  # fail at load
        # Found and checked now, parsed only when a name misses the text-embedding cache.
        source = None if isinstance(clip, CLIP) else record["clip_path"] if is_hub_id(clip) else clip  # Hub: its folder
        tokenizer = resolve_tokenizer(tokenizer, download=download, model=source)
    model = model.to(device=device)  # weights stay fp32; reduced precision is autocast (precision.py)
    models, role_record = load_role_models(spec, given, download, device, token)
    record.update(role_record)
    if torch_dtype != torch.float32 and tuned.reduced_weights:  # one reduced copy of what was read here
        read = ([] if isinstance(clip, CLIP) else [model.visual]) + [
            m for role, m in models.items() if role == "vfm" and not isinstance(given.get(role), torch.nn.Module)
        ]
        for vit in read:
            store_reduced(vit.matmul_weights(), torch_dtype)
    return Segmenter(
        model,
        spec,
        opts,
        config,
        vfm=models.get("vfm"),
        sam=models.get("sam"),
        tokenizer=tokenizer,
        device=device,
        dtype=torch_dtype,
        record=record,
        tuning=tuned,
    )
