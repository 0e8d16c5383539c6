"""The demo's model pool: each method runs on the weights it asks for; equal weights are loaded once."""

from __future__ import annotations

import numpy as np
import pytest

import ovss
from ovss.demo.session import DemoSession, ModelPool
from ovss.models.dino import build_vfm, convert_vfm_state_dict
from test_dino import dino_state_dict
from test_trident_pipeline import tiny_sam

SETTINGS = {"short_side": 112, "crop": 112, "stride": 56, "templates": "imagenet7"}
ORDERS = (
    ["proxyclip", "trident", "cass", "trident+gla"],
    ["trident", "proxyclip", "trident+gla", "cass", "proxyclip+gla"],
)


@pytest.fixture(scope="module")
def weights(tiny_dino) -> dict[str, object]:
    """Stand-ins for the registry's files: what each default weights name would load."""
    dino16 = build_vfm(*convert_vfm_state_dict(dino_state_dict(12, patch=16, grid=4)))
    return {"dino-vitb8": tiny_dino, "dino-vitb16": dino16, "sam-vitb": tiny_sam()}


@pytest.mark.parametrize("order", ORDERS, ids=["proxyclip-first", "trident-first"])
def test_every_method_runs_on_its_own_default_vfm_in_any_order(order, weights, tiny_clip, bpe_path):
    """The first DINO loaded is not handed to every later method (trident needs DINO-B/16, proxyclip DINO-B/8)."""
    files_read: list[str] = []

    def loader(method: str, **kw: object) -> ovss.Segmenter:
        for role in ("vfm", "sam"):
            if isinstance(kw.get(role), str):  # a name: "read the file"
                files_read.append(str(kw[role]))
                kw[role] = weights[str(kw[role])]
        return ovss.load(method, **kw)

    pool = ModelPool(tiny_clip, tokenizer=bpe_path, loader=loader, **SETTINGS)
    segs = {method: pool.get(method) for method in order}
    assert segs["proxyclip"].vfm is weights["dino-vitb8"] and segs["cass"].vfm is weights["dino-vitb8"]
    assert segs["trident"].vfm is weights["dino-vitb16"] and segs["trident+gla"].vfm is weights["dino-vitb16"]
    assert segs["trident"].sam is segs["trident+gla"].sam is weights["sam-vitb"]
    assert sorted(files_read) == ["dino-vitb16", "dino-vitb8", "sam-vitb"]  # each file once, SAM included
    assert pool.config("trident")["vfm"] == "<in-memory model>"  # the record of the load that built it
    image = np.random.default_rng(0).integers(0, 256, size=(75, 100, 3), dtype=np.uint8)
    results = DemoSession(pool).run(image, "sky, cat", ["proxyclip", "trident"])
    assert [r.method for r in results] == ["proxyclip", "trident"]


def test_a_vfm_given_to_the_pool_is_used_by_every_dino_guided_method(weights, tiny_clip, bpe_path):
    pool = ModelPool(tiny_clip, vfm=weights["dino-vitb8"], tokenizer=bpe_path, **SETTINGS)
    assert pool.get("proxyclip").vfm is pool.get("cass").vfm is weights["dino-vitb8"]
    assert pool.get("clearclip").vfm is None
