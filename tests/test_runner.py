"""The benchmark runner on the real VOC samples with the tiny CLIP: metrics, records, resume, helpers."""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import ovss
from ovss.errors import OvssError
from ovss.eval import distributed
from ovss.eval.checkpoint import load_checkpoint
from ovss.eval.datasets import FolderDataset
from ovss.eval.names import load_names
from ovss.eval.presets import ResolvedSetting, resolve
from ovss.eval.runner import build_segmenter, evaluate

# With short side 64 the 513 x 513 samples are processed at 64 x 64; windows 32 / 24 start at 0, 24, 32 and
# end at 32, 56, 64, so the seams are at 24, 32, 56, i.e. floor(b * 513 / 64 + 0.5) = 192, 257, 449.
SEAMS = (192, 257, 449)
NUM_CLASSES = 21
_GEOMETRY: dict[str, Any] = {"short_side": 64, "crop": 32, "stride": 24, "bg_threshold": 0.1}


@pytest.fixture(scope="module")
def dataset(assets_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FolderDataset:
    names = tmp_path_factory.mktemp("names") / "voc21.txt"
    names.write_text("".join(", ".join(n) + "\n" for n in load_names("voc21", "plain")))
    samples = assets_dir / "voc2012-val-samples"
    return FolderDataset(
        samples / "images", samples / "labels", names, image_suffix="_image", label_suffix="_label", has_background=True
    )


@pytest.fixture(scope="module")
def setting() -> ResolvedSetting:
    return resolve("clearclip", "custom", "clearclip", **_GEOMETRY)


@pytest.fixture(scope="module")
def load_kwargs(tiny_clip: Any, bpe_path: Path) -> dict[str, Any]:
    return {"clip": tiny_clip, "tokenizer": bpe_path, "templates": "imagenet7"}


@pytest.fixture(scope="module")
def full_run(
    dataset: FolderDataset,
    setting: ResolvedSetting,
    load_kwargs: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("full")
    result = evaluate(dataset, load_kwargs, setting, out, save_predictions=True, progress=False)
    return out, result


def _independent_counts(dataset: FolderDataset, predictions: Path, count: int) -> dict[str, Any]:
    """§7.1 and §7.2 recomputed in numpy from the saved prediction PNGs and the hand-derived seams."""
    inter, pred_area, label_area = (np.zeros(NUM_CLASSES, dtype=np.int64) for _ in range(3))
    errors = pairs = 0
    for index in range(count):
        sample = dataset[index]
        pred = np.asarray(Image.open(predictions / f"{sample.name}.png")).astype(np.int64)
        label = sample.label.astype(np.int64)
        keep = label != 255
        p, lab = pred[keep], label[keep]
        inter += np.bincount(p[p == lab], minlength=NUM_CLASSES)
        pred_area += np.bincount(p, minlength=NUM_CLASSES)
        label_area += np.bincount(lab, minlength=NUM_CLASSES)
        for b in SEAMS:
            for a, c, pa, pc in (
                (label[:, b - 1], label[:, b], pred[:, b - 1], pred[:, b]),
                (label[b - 1], label[b], pred[b - 1], pred[b]),
            ):
                kept = (a == c) & (a != 255)
                pairs += int(kept.sum())
                errors += int((kept & (pa != pc)).sum())
    return {
        "intersection": inter.tolist(),
        "pred_area": pred_area.tolist(),
        "label_area": label_area.tolist(),
        "ber_errors": errors,
        "ber_pairs": pairs,
    }


def _miou(counts: dict[str, Any]) -> float:
    inter, union = np.array(counts["intersection"]), np.array(counts["pred_area"]) + counts["label_area"]
    union = union - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return round(float(np.nanmean(iou)) * 100, 2)


def test_full_run_matches_an_independent_recomputation(full_run: tuple[Path, dict[str, Any]], dataset: Any) -> None:
    out, result = full_run
    counts = _independent_counts(dataset, out / "predictions", len(dataset))
    assert result["counts"] == counts
    assert result["images"] == 14 and result["complete"]
    assert result["mIoU"] == _miou(counts)
    assert result["BER"] == round(100 * counts["ber_errors"] / counts["ber_pairs"], 2)
    total_label = sum(counts["label_area"])
    assert result["aAcc"] == round(100 * sum(counts["intersection"]) / total_label, 2)
    assert [row["class"] for row in result["per_class"]] == dataset.class_names
    assert sum(counts["pred_area"]) == total_label  # every non-ignored pixel is predicted once
    assert json.loads((out / "result.json").read_text()) == result
    assert f"| {result['mIoU']:.2f} |" in (out / "result.md").read_text()


def test_config_json_records_the_resolved_configuration(full_run: tuple[Path, dict[str, Any]], dataset: Any) -> None:
    out, _ = full_run
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["preset"], config["dataset"]) == ("clearclip", "clearclip", "custom")
    assert config["setting"]["overrides"] == ["bg_threshold", "crop", "short_side", "stride"]
    pipeline = config["pipeline"]
    assert (pipeline["short_side"], pipeline["crop"], pipeline["stride"], pipeline["logit_scale"]) == (64, 32, 24, 50)
    assert pipeline["templates"] == "imagenet7" and config["options"] == {"last_n_layers": 1}
    assert config["classes"] == [list(n) for n in dataset.names] and config["num_images"] == 14
    assert (config["device"], config["dtype"], config["world_size"]) == ("cpu", "float32", 1)
    assert config["ovss_version"] == ovss.__version__ and config["torch_version"] == torch.__version__
    assert config["weights"]["clip"]["sha256"] is None  # an in-memory model has no file


def _counting(segmenter: Any, fail_at: int | None = None, on_fail: Any = None) -> list[int]:
    """Replace ``segmenter.predict`` by a wrapper that counts calls and raises on call ``fail_at``."""
    calls: list[int] = []
    original = segmenter.predict

    def predict(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            if on_fail is not None:
                on_fail()
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    segmenter.predict = predict
    return calls


@pytest.mark.parametrize("killed", [False, True])
def test_interrupt_and_resume_gives_the_uninterrupted_counts(
    full_run: tuple[Path, dict[str, Any]], dataset: Any, setting: Any, load_kwargs: Any, tmp_path: Path, killed: bool
) -> None:
    expected = _independent_counts(dataset, full_run[0] / "predictions", 6)
    segmenter = build_segmenter(setting, load_kwargs)
    checkpoint = tmp_path / "checkpoint" / "rank0-of-1.pt"
    backup = tmp_path / "periodic.pt"
    # the 4th call fails: 3 images are done, the last periodic checkpoint (every 2) holds 2 of them
    _counting(segmenter, fail_at=4, on_fail=lambda: shutil.copy(checkpoint, backup))
    with pytest.raises(RuntimeError, match="injected"):
        evaluate(dataset, segmenter, setting, tmp_path, limit=6, checkpoint_every=2, progress=False)
    assert not (tmp_path / "result.json").exists()
    if killed:  # a SIGKILL leaves only the periodic checkpoint
        shutil.copy(backup, checkpoint)
    done = 2 if killed else 3
    state = load_checkpoint(checkpoint, _identity_of(checkpoint), NUM_CLASSES, 1)
    assert state.done == set(range(done))
    calls = _counting(segmenter)
    result = evaluate(dataset, segmenter, setting, tmp_path, limit=6, resume=True, progress=False)
    assert len(calls) == 6 - done  # finished images are not predicted again
    assert result["counts"] == expected and result["images"] == 6 and not result["complete"]


def _identity_of(checkpoint: Path) -> str:
    return torch.load(checkpoint, weights_only=True)["identity"]


def test_limit_then_resume_finishes_the_rest(
    full_run: tuple[Path, dict[str, Any]], dataset: Any, setting: Any, load_kwargs: Any, tmp_path: Path
) -> None:
    segmenter = build_segmenter(setting, load_kwargs)
    calls = _counting(segmenter)
    first = evaluate(dataset, segmenter, setting, tmp_path, limit=2, progress=False)
    assert first["images"] == 2 and first["counts"] == _independent_counts(dataset, full_run[0] / "predictions", 2)
    second = evaluate(dataset, segmenter, setting, tmp_path, limit=5, resume=True, progress=False)
    assert len(calls) == 5
    assert second["counts"] == _independent_counts(dataset, full_run[0] / "predictions", 5)
    again = evaluate(dataset, segmenter, setting, tmp_path, limit=5, resume=True, progress=False)
    assert len(calls) == 5 and again["counts"] == second["counts"]  # a finished run resumes as a no-op


def test_resume_refuses_another_configuration_or_process_count(
    full_run: tuple[Path, dict[str, Any]], dataset: Any, setting: Any, load_kwargs: Any, tmp_path: Path
) -> None:
    out = full_run[0]
    other = resolve(
        "clearclip", "custom", "clearclip", short_side=64, crop=32, stride=24, bg_threshold=0.1, logit_scale=9
    )
    with pytest.raises(OvssError, match=r"another configuration \(differs in: pipeline\)"):
        evaluate(dataset, load_kwargs, other, out, resume=True, progress=False)
    assert json.loads((out / "config.json").read_text())["pipeline"]["logit_scale"] == 50.0  # left as it was
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "rank1-of-2.pt").write_bytes(b"")
    with pytest.raises(OvssError, match="written by 2 processes"):
        evaluate(dataset, load_kwargs, setting, tmp_path, resume=True, progress=False)


def test_a_finished_run_is_replaced_only_with_overwrite(
    full_run: tuple[Path, dict[str, Any]], dataset: Any, load_kwargs: Any, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    before = {name: (out / name).read_bytes() for name in ("config.json", "result.json", "result.md")}
    other = resolve("naclip", "custom", "naclip", short_side=64, crop=32, stride=24)
    with pytest.raises(OvssError, match=r"already holds a run \(clearclip on custom, preset clearclip\)"):
        evaluate(dataset, load_kwargs, other, out, limit=1, progress=False)
    assert {name: (out / name).read_bytes() for name in before} == before
    result = evaluate(dataset, load_kwargs, other, out, limit=1, overwrite=True, progress=False)
    assert result["method"] == "naclip" and json.loads((out / "result.json").read_text())["images"] == 1
    with pytest.raises(OvssError, match="is a file"):
        evaluate(dataset, load_kwargs, other, out / "result.json", limit=1, overwrite=True, progress=False)


def test_segmenter_must_match_the_setting(dataset: Any, setting: Any, load_kwargs: Any, tmp_path: Path) -> None:
    segmenter = ovss.load("clearclip", short_side=64, crop=32, stride=16, bg_threshold=0.1, **load_kwargs)
    with pytest.raises(OvssError, match=r"stride=16 \(setting: 24\)"):
        evaluate(dataset, segmenter, setting, tmp_path, progress=False)
    with pytest.raises(OvssError, match="set crop through the setting"):
        build_segmenter(setting, {**load_kwargs, "crop": 64})
    with pytest.raises(OvssError, match="limit must be >= 1"):
        evaluate(dataset, load_kwargs, setting, tmp_path, limit=0)


def test_duplicate_names_are_scored_as_given(dataset: Any, setting: Any, load_kwargs: Any, tmp_path: Path) -> None:
    # COCO-Object's bg-rename set lists "bed" as a background synonym and as a class: the shared name has the
    # same probability in both classes, so the later class can never win the argmax (ties -> lowest index).
    classes = [list(n) for n in dataset.names]
    classes[0] = ["background", "bed"]
    classes[20] = ["bed"]
    result = evaluate(dataset, load_kwargs, setting, tmp_path, limit=2, classes=classes, progress=False)
    assert result["images"] == 2 and result["counts"]["pred_area"][20] == 0
    assert sum(result["counts"]["pred_area"]) == sum(result["counts"]["label_area"])
    assert json.loads((tmp_path / "config.json").read_text())["classes"][0] == ["background", "bed"]


def test_distributed_helpers_in_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched_by_torchrun()
    with distributed.distributed_session("cpu") as context:
        assert context == distributed.SINGLE and context.is_main
    counts = torch.tensor([3, 5], dtype=torch.int64)
    assert torch.equal(distributed.all_reduce_sum(counts, context), counts)
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda:1") == "nccl"
    two = distributed.DistContext(rank=1, world_size=2, local_rank=1, backend="nccl")
    assert distributed.rank_device("cuda", two) == torch.device("cuda", 1)
    assert distributed.rank_device("cuda:0", two) == torch.device("cuda", 0)
    assert distributed.rank_device("cpu", two) == torch.device("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.launched_by_torchrun()
    with pytest.raises(OvssError, match="MASTER_ADDR, MASTER_PORT"), ExitStack() as stack:
        stack.enter_context(distributed.distributed_session("cpu"))


def test_check_segmenter_reads_composed_gla_options(tiny_clip, tiny_dino, bpe_path) -> None:
    import ovss
    from ovss.eval.presets import resolve
    from ovss.eval.runner import check_segmenter

    setting = resolve("gla-release", "voc21", "proxyclip+gla")
    assert setting.method_options == {"gla_rho": 0.55, "gla_clamp_mean": True}
    kw = dict(clip=tiny_clip, vfm=tiny_dino, tokenizer=bpe_path, **setting.pipeline_kwargs())
    check_segmenter(ovss.load(setting.method, **kw, **setting.method_options), setting)
    with pytest.raises(OvssError, match="rho"):
        check_segmenter(ovss.load(setting.method, **kw, gla_rho=0.6, gla_clamp_mean=True), setting)
