"""Models loaded from ``hf-hub:`` ids (served by tests/hub_server.py) against transformers' own models.

Each repository holds a tiny random model in the real layout (transformers' ``save_pretrained`` for CLIP,
DINOv2 with registers, DINOv3 and SAM; OpenCLIP's files for the LAION repository). What ovss loads from the
Hub must compute what transformers computes from the same weights, and ``ovss.load`` / ``ovss segment`` must
record the commit and the weights file's SHA-256.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovss
from hub_env import use_fake_hub
from hub_repos import CLIP_HF, DINOV2, DINOV3, GOOD_TOKEN, OPEN_CLIP, SAM, build_hub, models, open_clip_state_dict
from hub_server import FakeHub
from ovss.api import load_clip
from ovss.cli.main import main
from ovss.errors import OvssError
from ovss.models.clip import build_clip
from ovss.models.dino import load_vfm
from ovss.models.sam import load_sam


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    return models()


@pytest.fixture(scope="module")
def hub(reference: dict[str, object]) -> Iterator[FakeHub]:
    server = build_hub(**reference)  # type: ignore[arg-type]
    yield server
    server.stop()


@pytest.fixture
def cache(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_fake_hub(monkeypatch, hub, tmp_path)


def _pixels(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (B, 3, H, W)


def _vfm_tokens(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """All final-normed tokens (B, 1 + R + N, D), as transformers' last_hidden_state."""
    tokens, grid = vit.embed(x)
    return vit.ln_post(vit.forward_blocks(tokens, grid=grid))


def test_transformers_clip_repository_matches_transformers(reference, hub: FakeHub, cache: Path) -> None:
    model, record = load_clip(f"hf-hub:{CLIP_HF}")
    assert record["clip_format"] == "hf" and record["clip_revision"] == hub.repos[CLIP_HF].refs["main"]
    assert record["clip_file"] == "model.safetensors" and len(record["clip_sha256"]) == 64
    clip = reference["clip"]
    x = _pixels(64)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :4] = torch.tensor([512, 70, 300, 513])
    tokens[1, :6] = torch.tensor([512, 5, 6, 7, 400, 513])
    with torch.no_grad():
        image_ref = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)  # (2, 64)
        text_ref = clip.text_projection(clip.text_model(input_ids=tokens).pooler_output)  # (2, 64)
        torch.testing.assert_close(model.visual(x)[:, 0], image_ref, atol=1e-5, rtol=1e-4)  # [CLS], ln_post, proj
        torch.testing.assert_close(model.encode_text(tokens), text_ref, atol=1e-5, rtol=1e-4)


def test_open_clip_repository_is_the_same_model_as_its_weights(hub: FakeHub, cache: Path) -> None:
    """The LAION layout: heads, input statistics and GELU (open_clip's default) come from open_clip_config.json."""
    model, record = load_clip(f"hf-hub:{OPEN_CLIP}")
    assert record["clip_format"] == "open_clip" and record["clip_act"] == "gelu"
    assert record["clip_heads"] == [2, 2] and record["clip_file"] == "open_clip_model.safetensors"
    assert record["clip_configs"] == [str(Path(record["clip_path"]) / "open_clip_config.json")]
    direct = build_clip(open_clip_state_dict(), act="gelu", vision_heads=2, text_heads=2)
    quick = build_clip(open_clip_state_dict(), act="quick_gelu", vision_heads=2, text_heads=2)
    x = _pixels(224)[:1]
    with torch.no_grad():
        torch.testing.assert_close(model.visual(x), direct.visual(x), atol=0, rtol=0)
        assert (model.visual(x) - quick.visual(x)).abs().max() > 1e-4  # the activation matters


def test_dinov2_with_registers_repository_matches_transformers(reference, hub: FakeHub, cache: Path) -> None:
    vit, record = load_vfm(f"hf-hub:{DINOV2}")
    assert record["format"] == "hf-dinov2" and vit.cfg.heads == 2
    x = _pixels(56)
    with torch.no_grad():
        expected = reference["dinov2"](pixel_values=x).last_hidden_state  # (B, 1 + 4 + 16, D)
        torch.testing.assert_close(_vfm_tokens(vit, x), expected, atol=1e-5, rtol=1e-4)


def test_gated_dinov3_repository_matches_transformers_at_each_revision(
    reference, hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    x = _pixels(64)
    for revision, which in (("", "new"), ("@v1.0", "old")):
        vit, record = load_vfm(f"hf-hub:{DINOV3}{revision}")
        assert record["format"] == "hf-dinov3"
        with torch.no_grad():
            expected = reference["dinov3"][which](pixel_values=x).last_hidden_state  # (B, 1 + 4 + N, D)
            torch.testing.assert_close(_vfm_tokens(vit, x), expected, atol=1e-4, rtol=1e-4)


def test_sam_repository_matches_transformers(reference, hub: FakeHub, cache: Path) -> None:
    from test_sam import SIZE

    sam = load_sam(f"hf-hub:{SAM}")
    x = _pixels(SIZE)
    with torch.no_grad():
        expected = reference["sam"].get_image_embeddings(x)  # (B, C, g, g)
        torch.testing.assert_close(sam.image_encoder(x), expected, atol=1e-5, rtol=1e-4)


def test_load_records_the_commits_and_hashes_and_a_pin_changes_the_result(hub: FakeHub, cache: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    kw = dict(clip=f"hf-hub:{CLIP_HF}", token=GOOD_TOKEN, short_side=None, crop=64, stride=32)
    latest = ovss.load("proxyclip", vfm=f"hf-hub:{DINOV3}", **kw)
    pinned = ovss.load("proxyclip", vfm=f"hf-hub:{DINOV3}@v1.0", **kw)
    repo = hub.repos[DINOV3]
    assert latest.config["vfm"] == f"hf-hub:{DINOV3}" and latest.config["vfm_revision"] == repo.refs["main"]
    assert pinned.config["vfm"] == f"hf-hub:{DINOV3}@v1.0" and pinned.config["vfm_revision"] == repo.refs["v1.0"]
    assert pinned.config["vfm_sha256"] != latest.config["vfm_sha256"] and pinned.config["vfm_format"] == "hf-dinov3"
    assert pinned.config["clip_revision"] == hub.repos[CLIP_HF].refs["main"]
    assert GOOD_TOKEN not in json.dumps(pinned.config, default=str)  # a token is never recorded
    from ovss.eval.report import weights_record  # what the eval report's config.json says of the weights

    assert weights_record(pinned.config)["vfm"] == {
        "name": f"hf-hub:{DINOV3}@v1.0",
        "path": pinned.config["vfm_path"],
        "sha256": pinned.config["vfm_sha256"],
        "format": "hf-dinov3",
        "revision": repo.refs["v1.0"],
    }
    a, b = latest.predict(image, ["cat", "dog"]), pinned.predict(image, ["cat", "dog"])
    assert a.logits.shape == b.logits.shape == (2, 48, 64)
    assert (a.logits - b.logits).abs().max() > 1e-6  # other weights, other logits
    again = ovss.load("proxyclip", vfm=str(Path(pinned.config["vfm_path"])), **kw).predict(image, ["cat", "dog"])
    torch.testing.assert_close(again.logits, b.logits, atol=0, rtol=0)  # the Hub id is its snapshot folder


def test_trident_takes_sam_from_the_hub(hub: FakeHub, cache: Path) -> None:
    seg = ovss.load("trident", clip=f"hf-hub:{CLIP_HF}", vfm=f"hf-hub:{DINOV3}", sam=f"hf-hub:{SAM}", token=GOOD_TOKEN)
    assert seg.config["sam"] == f"hf-hub:{SAM}" and seg.config["sam_revision"] == hub.repos[SAM].refs["main"]
    assert seg.config["vfm_format"] == "hf-dinov3" and len(seg.config["sam_sha256"]) == 64
    assert seg.config["sam_path"] == seg.config["sam_path"] and Path(seg.config["sam_path"]).is_dir()


def test_ovss_segment_from_the_hub_records_the_revision(
    hub: FakeHub, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(image)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)  # the gated DINOv3

    def segment(out: Path) -> int:
        args = ["segment", str(image), "--labels", "sky, road", "--method", "proxyclip", "--out", str(out)]
        args += ["--clip", f"hf-hub:{CLIP_HF}", "--vfm", f"hf-hub:{DINOV3}@v1.0", "--short-side", "48"]
        return main([*args, "--no-progress"])

    assert segment(tmp_path / "out") == 0
    assert (tmp_path / "out" / "photo.png").is_file()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vfm"] == f"hf-hub:{DINOV3}@v1.0" and config["vfm_revision"] == hub.repos[DINOV3].refs["v1.0"]
    assert config["clip_revision"] == hub.repos[CLIP_HF].refs["main"] and len(config["vfm_sha256"]) == 64
    start = len(hub.requests)  # a second run offline, without the token: the cache only
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN")
    assert segment(tmp_path / "again") == 0
    assert hub.requests[start:] == []
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (again["vfm_revision"], again["vfm_sha256"]) == (config["vfm_revision"], config["vfm_sha256"])


def test_offline_every_uncached_hub_id_is_named_before_any_model_loads(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ovss.api

    ovss.load("proxyclip", clip=f"hf-hub:{CLIP_HF}", vfm=f"hf-hub:{DINOV2}")  # both cached now; SAM is not
    monkeypatch.setenv("OVSS_OFFLINE", "1")

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the missing Hub weights were reported")

    monkeypatch.setattr(ovss.api, "load_clip", no_loading)
    start = len(hub.requests)
    with pytest.raises(OvssError, match=rf"SAM weights 'hf-hub:{SAM}' are not in the Hugging Face cache") as caught:
        ovss.load("trident", clip=f"hf-hub:{CLIP_HF}", vfm=f"hf-hub:{DINOV2}", sam=f"hf-hub:{SAM}")
    assert "Also:" not in str(caught.value) and hub.requests[start:] == []  # only SAM is missing; no request
    with pytest.raises(OvssError, match=r"'hf-hub:nobody/clip' are not in .* Also: .*'hf-hub:nobody/dino'"):
        ovss.load("proxyclip", clip="hf-hub:nobody/clip", vfm="hf-hub:nobody/dino")
