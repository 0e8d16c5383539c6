"""SAM weights by name: the ``sam-vitb`` registry entry, ``ovss download``, the offline message, loader errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ovss.cli.main import main
from ovss.errors import OvssError
from ovss.models.sam import load_sam
from ovss.storage import hub
from test_sam import SIZE, _tiny_hf_sam, official_state_dict
from tiny import tiny_clip_state_dict

URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        return


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SAM in the official layout, as the served ``sam_vit_b_01ec64.pth``."""
    root = tmp_path_factory.mktemp("www")
    torch.save(official_state_dict(_tiny_hf_sam()), root / "sam_vit_b_01ec64.pth")
    return root / "sam_vit_b_01ec64.pth"


@pytest.fixture
def server(official: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(official.parent)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("OVSS_CACHE", str(folder))
    monkeypatch.delenv("OVSS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return folder


def test_registry_entry() -> None:
    entry = hub.REGISTRY["sam-vitb"]
    assert hub.available_models("sam") == ["sam-vitb"]
    assert (entry.url, entry.filename, entry.kind, entry.format) == (URL, "sam_vit_b_01ec64.pth", "sam", "sam")
    assert entry.heads == (12, 8) and entry.sha256 is None  # Meta publishes no SHA-256
    with pytest.raises(OvssError, match=r"'sam-vitb' names SAM weights, not VFM weights"):
        hub.resolve("sam-vitb", kind="vfm")


def test_offline_message_names_the_file_its_url_and_the_flag(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    assert main(["download", "sam-vitb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line, no traceback
    assert f"SAM weights 'sam-vitb' are not cached at {cache / 'sam_vit_b_01ec64.pth'}" in err
    assert f"sam_vit_b_01ec64.pth <- {URL} (SHA-256 not registered; recorded at first use)" in err
    assert "--sam PATH (or sam=PATH)" in err and "OVSS_OFFLINE=1" in err
    with pytest.raises(OvssError, match=r"SAM weights 'sam-vitb' are not cached"):
        load_sam("sam-vitb")
    with pytest.raises(OvssError, match=r"downloads disabled.*sam_vit_b_01ec64.pth <- .*--sam PATH"):
        hub.check_offline([("sam-vitb", "sam")], download=False)


def test_download_then_load_offline(
    server: str, official: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(
        hub.REGISTRY, "sam-vitb", replace(hub.REGISTRY["sam-vitb"], url=f"{server}/sam_vit_b_01ec64.pth")
    )
    assert main(["download", "sam-vitb", "--quiet"]) == 0
    target = cache / "sam_vit_b_01ec64.pth"
    assert target.read_bytes() == official.read_bytes()
    assert f"sam-vitb: {target}" in capsys.readouterr().out
    assert (cache / "sam_vit_b_01ec64.pth.sha256").is_file()  # digest recorded at first download
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    by_name, by_path = load_sam("sam-vitb"), load_sam(str(official))
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(by_name.image_encoder(pixels), by_path.image_encoder(pixels))


def test_loader_errors_are_one_line(official: Path, tmp_path: Path) -> None:
    with pytest.raises(OvssError, match=r"SAM weights '.*missing.pth' is neither an existing path nor a registered"):
        load_sam(str(tmp_path / "missing.pth"))
    torch.save(tiny_clip_state_dict(), tmp_path / "clip.pt")
    with pytest.raises(OvssError, match=r"clip.pt is not a SAM state dict \(keys such as .*--sam PATH"):
        load_sam(str(tmp_path / "clip.pt"))
    sd = torch.load(official, weights_only=True)
    del sd["mask_decoder.iou_token.weight"]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(
        OvssError, match=r"cut.pth does not form a SAM \(missing mask_decoder.iou_token.weight\); supply"
    ):
        load_sam(str(tmp_path / "cut.pth"))


def test_hugging_face_config_with_other_settings_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    model = _tiny_hf_sam()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(OvssError, match=r"hidden_act is 'relu', but ovss runs SAM as the official code"):
        load_sam(str(folder))
