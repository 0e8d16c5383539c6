"""``ovss bench``: the quick run writes a complete JSON record of measured numbers; FLOPs are counted exactly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovss.cli.bench_harness import MatmulFlops, measure
from ovss.cli.main import main

RUN_KEYS = {
    "method", "precision", "device", "image", "windows", "seconds", "seconds_all", "warmup_seconds", "load_seconds",
    "quiet_check", "background_cores", "disturbed_runs", "redone", "redone_seconds", "flops",
    "load_peak_rss_bytes", "run_peak_rss_bytes", "peak_rss_bytes", "gpu_loaded_bytes", "gpu_peak_allocated_bytes",
    "gpu_peak_reserved_bytes", "flop_bound_seconds", "bound_ratio",
}  # fmt: skip


def test_quick_bench_writes_a_record_of_positive_numbers(
    tmp_path: Path, bpe_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--methods", "clearclip,proxyclip", "--precision", "fp32,bf16", "--threads", "1"]
    argv += ["--repeats", "1", "--weights-dir", str(tmp_path / "w"), "--tokenizer", str(bpe_path), "--json", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["weights"] == "random tiny (--quick)"
    assert record["peak_gflops"]["float32"] > 0 and record["peak_gflops"]["bfloat16"] > 0
    assert record["peaks"]["sizes"] == [256, 512] and record["peaks"]["threads"] == 1  # --quick: small products
    assert record["device"] == "cpu" and record["machine"]["threads"] == 1 and record["machine"]["cpu"]
    assert record["quiet"]["available"] == Path("/proc/stat").is_file() and record["quiet"]["max_other"] == 0.1
    assert record["quiet"]["wait_seconds"] == 0 and record["quiet"]["waits"] == []  # --quick never waits
    assert [(r["method"], r["precision"]) for r in record["runs"]] == [
        ("clearclip", "fp32"), ("clearclip", "bf16"), ("proxyclip", "fp32"), ("proxyclip", "bf16"),
    ]  # fmt: skip
    for run in record["runs"]:
        assert set(run) == RUN_KEYS
        assert run["windows"] > 1 and run["image"] == "112x112"
        assert run["seconds"] > 0 and run["load_seconds"] > 0 and run["flop_bound_seconds"] > 0
        assert 50e6 < run["peak_rss_bytes"] < 16 * 2**30
        assert run["bound_ratio"] == pytest.approx(run["seconds"] / run["flop_bound_seconds"])
        assert run["bound_ratio"] >= 1 - 1e-9  # a run beating its bound raises the peak instead
        assert run["device"] == "cpu" and run["gpu_peak_allocated_bytes"] is None
        assert len(run["background_cores"]) == len(run["seconds_all"]) == 1 and run["redone"] <= 3
    fp32, bf16 = record["runs"][0]["flops"], record["runs"][1]["flops"]
    assert set(fp32) == {"float32"} and fp32["float32"] > 1e8  # the backbone's products, all fp32
    assert bf16["bfloat16"] > 0.9 * fp32["float32"]  # autocast: the backbone's products run in bf16
    text = record["text"]
    assert text["names"] == 20 and text["cold_seconds"] > text["warm_same_process_seconds"] >= 0
    assert text["warm_new_process_seconds"] > 0
    shown = capsys.readouterr()
    assert "| clearclip | fp32 | 112x112 |" in shown.out and "text, 20 names" in shown.out
    head = shown.out.splitlines()
    assert head[2].startswith("quiet check: ") and head[3].startswith("machine: ") and "threads" in head[3]
    assert head[4].startswith("matmul peak (best square product of 256³ to 512³, 1 timed runs each, 1 threads)")
    assert "timed run(s) redone" in shown.out or "quiet check unavailable" in shown.out
    progress = [line for line in shown.err.splitlines() if line.startswith("ovss bench: [")]
    assert progress == [
        "ovss bench: [1/4] clearclip fp32 ...", "ovss bench: [2/4] clearclip bf16 ...",
        "ovss bench: [3/4] proxyclip fp32 ...", "ovss bench: [4/4] proxyclip bf16 ...",
    ]  # fmt: skip
    # --quick runs the four in one process: the same job in a fresh process counts the same products
    weights = {"files": {"ViT-B/16": str(tmp_path / "w" / "clip-vitb16-tiny.pt"),
                         "dino-vitb8": str(tmp_path / "w" / "dino-vitb8-tiny.pth")}}  # fmt: skip
    settings = {"short_side": 112, "crop": 56, "stride": 28}
    job = {"kind": "image", "threads": 1, "method": "proxyclip", "dtype": "bf16", "image": "112x112", "repeats": 1}
    alone = measure({**job, **weights, "tokenizer": str(bpe_path), "settings": settings})
    assert alone["flops"] == record["runs"][3]["flops"] and alone["windows"] == record["runs"][3]["windows"]


def test_existing_json_is_refused_before_any_measurement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    out.write_text("keep me")
    assert main(["bench", "--quick", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and err.count("\n") == 1
    assert out.read_text() == "keep me"
    assert not (tmp_path / "w").exists()


def test_device_cuda_without_cuda_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--quick", "--device", "cuda", "--weights-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "needs CUDA" in err and "--device cpu" in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("bad", [["--precision", "fp8"], ["--size", "12x"], ["--methods", "clearclip,nope"],
                                 ["--max-redos", "-1"]])  # fmt: skip
def test_bad_arguments_are_one_line(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", *bad]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_matmul_flops_counts_products_per_dtype_by_hand() -> None:
    x = torch.randn(2, 5, 8)  # (B, n, D)
    w, b = torch.randn(16, 8), torch.randn(16)
    q = torch.randn(1, 2, 5, 4)  # (B, H, n, d)
    counter = MatmulFlops()
    with torch.inference_mode(), counter:
        y = F.linear(x, w, b)  # 2 * (2*5) * 8 * 16
        x @ x.transpose(1, 2)  # 2 * 2 * 5 * 5 * 8
        F.scaled_dot_product_attention(q, q, q)  # 4 * 2 * 5 * 5 * 4
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.linear(x, w, b)  # 2 * 10 * 8 * 16, in bf16
    assert dict(counter.flops) == {"float32": 2560 + 800 + 800, "bfloat16": 2560}
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=0, atol=0)  # counting changes no result
    dense = torch.zeros(4, 6)
    dense[0, 1], dense[2, 3], dense[3, 5] = 1.0, 1.0, 1.0
    sparse_counter = MatmulFlops()
    with sparse_counter, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta" (once per process)
        out = dense.to_sparse_csr() @ w[:6, :5]  # GLA's proxy means: 3 stored entries x 5 columns x 2
    assert dict(sparse_counter.flops) == {"float32": 30}
    torch.testing.assert_close(out, dense @ w[:6, :5])


def test_each_method_asks_for_its_own_default_weights() -> None:
    """ovss bench writes (or finds) what each method's spec names, never a VFM chosen by method name."""
    from ovss.methods.registry import needed_weights

    assert needed_weights(["clearclip"]) == ["ViT-B/16"]
    assert needed_weights(["proxyclip", "trident", "cass+gla"]) == ["ViT-B/16", "dino-vitb8", "dino-vitb16", "sam-vitb"]
    assert needed_weights(["trident"], {"vfm": "my-dino.pth", "clip": "clip.pt"}) == ["sam-vitb"]


def test_quick_stand_ins_give_trident_finite_features(tmp_path: Path, bpe_path: Path) -> None:
    """The random SAM stand-in is not the module's zero init (zero q/k/v and positions made Trident's affinities
    0/0): the quick bench times Trident on real numbers."""
    import numpy as np

    import ovss
    from ovss.cli.bench_weights import write_random_weights

    files = write_random_weights(tmp_path, quick=True, names=["dino-vitb16", "sam-vitb"])
    seg = ovss.load("trident", clip=files["ViT-B/16"], vfm=files["dino-vitb16"], sam=files["sam-vitb"],
                    tokenizer=bpe_path, download=False, short_side=112, crop=64, stride=32)  # fmt: skip
    seg.set_image(np.random.default_rng(0).integers(0, 256, (93, 141, 3), dtype=np.uint8))
    assert torch.isfinite(seg.image_state().features).all()
