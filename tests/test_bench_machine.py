"""``ovss bench``'s machine checks without timing: disturbed runs (fake load sources and clocks), peaks and bounds,
the header and record fields, the GPU record layout with a stand-in ``torch.cuda``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ovss.cli import bench_harness
from ovss.cli.bench_machine import (
    DeviceTimer,
    QuietPolicy,
    clock_tick,
    cpu_model,
    flop_bound_seconds,
    is_disturbed,
    isa_flags,
    machine_info,
    machine_line,
    peaks_job,
    proc_load_source,
    quiet_check_line,
    raised_peaks,
    timed_runs,
    wait_for_quiet,
)
from ovss.cli.bench_report import paper_comparison, row, settle_peaks, summary_line, table_head, with_bound


class FakeMachine:
    """A clock and a load source: each run lasts ``wall`` seconds while others use ``others[i]`` cores."""

    def __init__(self, others: list[float], wall: float = 1.0) -> None:
        self.others, self.wall = list(others), wall
        self.now, self.other_seconds, self.runs = 0.0, 0.0, 0

    def clock(self) -> float:
        return self.now

    def load(self) -> float:
        return self.other_seconds

    def run(self) -> None:
        cores = self.others[self.runs] if self.runs < len(self.others) else 0.0
        self.runs += 1
        self.now += self.wall
        self.other_seconds += cores * self.wall


def test_a_disturbed_run_is_redone_and_counted() -> None:
    machine = FakeMachine(others=[0.5, 0.0, 0.02])  # the first run: others used half a core
    timing = timed_runs(machine.run, 2, QuietPolicy(max_other=0.1, max_redos=3), machine.load, machine.clock)
    assert machine.runs == 3
    assert timing["redone"] == 1 and timing["redone_seconds"] == [1.0]
    assert timing["seconds"] == [1.0, 1.0] and timing["disturbed"] == [False, False] and timing["disturbed_runs"] == 0
    assert timing["background_cores"] == pytest.approx([0.0, 0.02])


def test_a_run_that_stays_disturbed_is_kept_and_marked() -> None:
    machine = FakeMachine(others=[1.0] * 10)  # never quiet
    timing = timed_runs(machine.run, 3, QuietPolicy(max_other=0.1, max_redos=2), machine.load, machine.clock)
    assert machine.runs == 5  # 3 results + the 2 redos the budget allows
    assert timing["redone"] == 2 and timing["disturbed"] == [True, True, True] and timing["disturbed_runs"] == 3
    r = {"method": "sclip", "precision": "fp32", "image": "512x512", "windows": 4, "seconds": 6.02,
         "seconds_all": timing["seconds"], "background_cores": timing["background_cores"],
         "disturbed_runs": timing["disturbed_runs"], "redone": timing["redone"], "flops": {"float32": 10**12},
         "peak_rss_bytes": 2**30}  # fmt: skip
    line = row(with_bound(r, {"float32": 200.0, "bfloat16": 400.0}))
    assert "| ~6.020 (disturbed 3/3) | 2 | 1.00 |" in line and "~1.20×" in line  # never a clean number
    assert "| 6.020 |" not in line
    assert "sclip fp32" in summary_line([r], quiet_check=True) and "2 timed run(s) redone" in summary_line([r], True)
    clean = {**r, "disturbed_runs": 0, "redone": 1}
    assert "~" not in row(with_bound(clean, {"float32": 200.0}))
    assert "every result in the table comes from undisturbed runs" in summary_line([clean], True)
    assert "unavailable" in summary_line([clean], quiet_check=False)


def test_threshold_allows_one_clock_tick_then_counts_the_load() -> None:
    policy = QuietPolicy(max_other=0.1)
    tick = clock_tick()
    assert not is_disturbed(0.1 * 2.0 + tick - 1e-9, 2.0, policy)  # the limit plus one tick: quiet
    assert is_disturbed(0.1 * 2.0 + tick + 1e-3, 2.0, policy)
    assert not is_disturbed(0.0, 0.001, policy) and is_disturbed(tick * 2, 0.001, policy)


def test_without_a_load_source_nothing_is_redone_and_the_check_says_unavailable(tmp_path: Path) -> None:
    machine = FakeMachine(others=[5.0] * 3)
    timing = timed_runs(machine.run, 3, QuietPolicy(), None, machine.clock)
    assert machine.runs == 3 and timing["redone"] == 0 and timing["background_cores"] == [None] * 3
    assert proc_load_source([1], proc=tmp_path) is None  # no stat file: e.g. macOS
    assert "unavailable" in quiet_check_line(None, QuietPolicy())
    nothing = {"quiet": None, "waited_seconds": 0.0, "background_cores": None}
    assert wait_for_quiet(None, QuietPolicy(), print) == nothing


def test_proc_load_source_subtracts_the_benchmarks_own_processes(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu  700 20 100 5000 30 5 6 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    for pid, (utime, stime) in {11: (200, 50), 12: (30, 3)}.items():
        (tmp_path / str(pid)).mkdir()
        fields = ["S", *["0"] * 10, str(utime), str(stime), *["0"] * 30]  # state .. utime (14) stime (15)
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (odd (name) x) {' '.join(fields)}\n")
    load = proc_load_source([11, 12, 99], proc=tmp_path)  # 99 is gone: counts 0
    assert load is not None
    busy = 700 + 20 + 100 + 5 + 6 + 7  # user nice system irq softirq steal (idle and iowait not)
    assert load() == pytest.approx((busy - 250 - 33) * clock_tick())


def test_waiting_for_a_quiet_machine_is_bounded_and_said() -> None:
    said: list[str] = []
    now = [0.0]
    busy = [1.0, 0.5, 0.0]  # cores of others in each 1 s interval
    used = [0.0]

    def sleep(seconds: float) -> None:
        used[0] += (busy.pop(0) if busy else 0.0) * seconds
        now[0] += seconds

    quiet = wait_for_quiet(lambda: used[0], QuietPolicy(wait_seconds=60), said.append, 1.0, lambda: now[0], sleep)
    assert quiet == {"quiet": True, "waited_seconds": 3.0, "background_cores": 0.0}
    assert said[0].startswith("waiting for a quiet machine: other processes use 1.00 cores")
    assert said[-1].startswith("quiet after 3 s") and len(said) == 2
    said.clear()
    busy[:] = [2.0] * 100
    loud = wait_for_quiet(lambda: used[0], QuietPolicy(wait_seconds=5), said.append, 1.0, lambda: now[0], sleep)
    assert loud["quiet"] is False and loud["waited_seconds"] == pytest.approx(5.0)
    assert said[-1].startswith("not quiet after 5 s (others use 2.00 cores)")


def test_bound_uses_the_measured_peak_per_dtype() -> None:
    peaks = {"float32": 1.0, "bfloat16": 4.0}  # GFLOP/s
    assert flop_bound_seconds({"float32": 10**9, "bfloat16": 4 * 10**9}, peaks) == pytest.approx(2.0)
    assert flop_bound_seconds({"float16": 4 * 10**9}, peaks) == pytest.approx(1.0)  # no fp16 peak: bf16's
    assert flop_bound_seconds({"float16": 4 * 10**9}, {**peaks, "float16": 8.0}) == pytest.approx(0.5)


def test_a_run_faster_than_its_bound_raises_the_peak_instead_of_printing_below_one() -> None:
    run = {"method": "m", "precision": "bf16", "seconds": 2.0, "flops": {"bfloat16": 8 * 10**9, "float32": 10**9}}
    peaks = {"float32": 1.0, "bfloat16": 4.0}  # bound 1 + 2 = 3 s > the 2 s the run took
    # bf16 products fit the 2 s minus fp32's 1 s: 8 GFLOP in 1 s
    assert raised_peaks(run, peaks) == {"float32": 1.0, "bfloat16": 8.0}
    assert raised_peaks({**run, "seconds": 3.5}, peaks) == peaks  # slower than the bound: unchanged
    calls: list[int] = []

    def remeasure_low() -> dict[str, float]:
        calls.append(1)
        return {"float32": 0.9, "bfloat16": 5.0}  # better, still too low

    settled, note = settle_peaks(run, peaks, remeasure_low)
    assert calls == [1] and settled == {"float32": 1.0, "bfloat16": 8.0}  # fp32 kept at the better 1.0
    assert note is not None and "raised" in note and "bf16 4 -> 8" in note
    assert with_bound(run, settled)["bound_ratio"] == pytest.approx(1.0)
    settled, note = settle_peaks(run, peaks, lambda: {"float32": 2.0, "bfloat16": 16.0})
    assert settled == {"float32": 2.0, "bfloat16": 16.0} and note is not None and "measured again" in note
    assert with_bound(run, settled)["bound_ratio"] == pytest.approx(2.0 / 1.0)
    calls.clear()
    assert settle_peaks({**run, "seconds": 3.5}, peaks, remeasure_low) == (peaks, None) and calls == []
    assert raised_peaks({**run, "flops": {"float32": 10**9}, "seconds": 0.25}, peaks)["float32"] == 4.0


def test_peaks_job_reports_its_sizes_threads_and_rates() -> None:
    peaks = peaks_job({"quick": True, "dtypes": ["float32", "bfloat16"]})  # 256³ and 512³: a smoke run
    assert set(peaks["gflops"]) == {"float32", "bfloat16"} and min(peaks["gflops"].values()) > 0
    assert peaks["sizes"] == [256, 512] and peaks["repeats"] == 1 and peaks["threads"] == torch.get_num_threads()
    assert all(d["size"] in (256, 512) for d in peaks["detail"].values()) and peaks["device"] == "cpu"


def test_machine_fields_in_the_record_and_the_header(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n")
    assert cpu_model(cpuinfo) == "Some CPU 9000" and isa_flags(cpuinfo) == ["avx2", "avx512f", "amx_tile", "amx_bf16"]
    assert isa_flags(tmp_path / "missing") is None and cpu_model(tmp_path / "missing")  # platform's name instead
    info = machine_info(2)
    assert set(info) >= {"cpu", "logical_cpus", "cpus_available", "threads", "isa", "torch", "torch_cpu_capability"}
    assert info["threads"] == 2 and info["torch"] == torch.__version__
    line = machine_line({**info, "cpu": "Some CPU", "isa": ["avx512f"]})
    assert line.startswith("machine: Some CPU, ") and "ISA avx512f (no AMX)" in line and "gpu:" not in line
    gpu = {"gpu": "NVIDIA RTX A6000", "gpu_memory_bytes": 48 * 2**30, "driver": "550.54", "cuda": "12.4"}
    assert "\ngpu: NVIDIA RTX A6000 (48 GiB), driver 550.54, CUDA 12.4" in machine_line({**info, **gpu})


class FakeCuda:
    """A stand-in for ``torch.cuda``'s timing and memory calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.allocated, self.peak = 1_000, 5_000

    def synchronize(self, device: Any) -> None:
        self.calls.append("sync")

    def memory_allocated(self, device: Any) -> int:
        return self.allocated

    def reset_peak_memory_stats(self, device: Any) -> None:
        self.calls.append("reset")
        self.peak = self.allocated

    def max_memory_allocated(self, device: Any) -> int:
        return self.peak

    def max_memory_reserved(self, device: Any) -> int:
        return 2 * self.peak


def test_gpu_record_layout_with_a_stand_in() -> None:
    cuda = FakeCuda()
    timer = DeviceTimer(torch.device("cuda", 0), cuda)
    timer.start()
    cuda.peak = 3 * 2**30  # the runs' peak
    timer.sync()
    assert timer.memory() == {"gpu_loaded_bytes": 1_000, "gpu_peak_allocated_bytes": 3 * 2**30,
                              "gpu_peak_reserved_bytes": 6 * 2**30}  # fmt: skip
    assert cuda.calls == ["sync", "reset", "sync", "sync"]
    on_cpu = DeviceTimer(torch.device("cpu"), cuda)
    on_cpu.start()
    on_cpu.sync()
    assert set(on_cpu.memory().values()) == {None} and len(cuda.calls) == 4  # a CPU never touches the GPU
    run = {"method": "proxyclip+gla", "precision": "fp16", "image": "336x497", "windows": 8, "seconds": 0.2156,
           "seconds_all": [0.2156], "background_cores": [0.0], "disturbed_runs": 0, "redone": 0,
           "flops": {"float16": 10**12}, "peak_rss_bytes": 2**30, **timer.memory()}  # fmt: skip
    line = row(with_bound(run, {"float32": 50e3, "bfloat16": 300e3, "float16": 300e3}))
    assert "| 0.216 | 0 | 0.00 | 3.00 / 6.00 | 1.00 |" in line
    assert "GPU peak alloc / reserved (GiB)" in table_head(gpu=True) and "GPU" not in table_head(gpu=False)
    table = paper_comparison([run, {**run, "method": "cass", "windows": 1, "seconds": 2.9}])
    assert "A6000" in table[0] and "PASCAL Context 59" in table[0]
    rows = [line for line in table if line.startswith("| proxyclip+gla") or line.startswith("| cass")]
    assert len(rows) == 2  # 8 windows: only the paper's stride-112 GLA row (431 ms, 1.9 GB)
    assert "| GLA, stride 112 (8 windows) | 0.431 | 1.9 | 0.50× | 1.58× |" in rows[0]
    assert "| CASS (1 windows) | 5.799 | 7.6 | 0.50× | 0.39× |" in rows[1]


def test_image_job_redoes_disturbed_runs_in_the_measurement_process(
    tmp_path: Path, bpe_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harness wires the check into its timed runs: a load source reporting 100 s of others' CPU for the
    first two runs makes them redone (budget 3) or, with a budget of 1, the second one kept and marked."""
    from ovss.cli.bench_weights import write_random_weights

    files = write_random_weights(tmp_path, quick=True)
    job = {"kind": "image", "threads": 1, "method": "clearclip", "image": "64x64", "repeats": 1, "files": files,
           "tokenizer": str(bpe_path), "device": "cpu"}  # fmt: skip
    job["settings"] = {"short_side": 112, "crop": 56, "stride": 28}

    def fake_source(own: Any) -> Any:
        readings = iter([0.0, 100.0, 100.0, 200.0])  # run 1: +100 s, run 2: +100 s, then quiet

        def other() -> float:
            return next(readings, 200.0)

        return other

    monkeypatch.setattr(bench_harness, "proc_load_source", fake_source)
    r = bench_harness.image_job({**job, "policy": {"max_redos": 3}})
    assert r["redone"] == 2 and r["disturbed_runs"] == 0 and len(r["seconds_all"]) == 1 and r["device"] == "cpu"
    assert r["gpu_peak_allocated_bytes"] is None and r["quiet_check"] is True
    r = bench_harness.image_job({**job, "policy": {"max_redos": 1}})
    assert r["redone"] == 1 and r["disturbed_runs"] == 1 and r["background_cores"][0] > 1


def test_peaks_line_names_sizes_runs_and_kept_disturbed_runs() -> None:
    from ovss.cli.bench_report import peaks_line

    peaks = {"gflops": {"float32": 188.4, "bfloat16": 384.0}, "sizes": [1024, 2048, 3072, 4096], "repeats": 3,
             "threads": 2, "detail": {"float32": {"size": 4096, "disturbed_runs": 0},
                                      "bfloat16": {"size": 3072, "disturbed_runs": 2}}}  # fmt: skip
    assert peaks_line(peaks) == (
        "matmul peak (best square product of 1024³ to 4096³, 3 timed runs each, 2 threads): "
        "fp32 188 (at 4096³), bf16 384 (at 3072³) (~: 2 disturbed runs kept) GFLOP/s"
    )


def test_cuda_device_defaults_to_three_precisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device plumbing without a GPU: a device check that accepts cuda gives fp32, fp16 and bf16 runs."""
    import argparse

    import ovss.api
    from ovss.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    monkeypatch.setattr(ovss.api, "check_device", lambda device: torch.device(device))
    args = parser.parse_args(["bench", "--device", "cuda:0", "--methods", "clearclip", "--clip", "x.pt"])
    methods, precisions, *_ = bench._check_args(args)
    assert precisions == ["fp32", "fp16", "bf16"] and args.device == "cuda:0" and methods == ["clearclip"]
    args = parser.parse_args(["bench", "--methods", "clearclip", "--clip", "x.pt"])
    assert bench._check_args(args)[1] == ["fp32", "bf16"] and args.device == "cpu"
    args = parser.parse_args(["bench", "--device", "cuda", "--dtype", "fp16", "--clip", "x.pt"])
    assert bench._check_args(args)[1] == ["fp16"]


def test_a_run_faster_than_its_other_dtypes_alone_scales_every_peak() -> None:
    run = {"seconds": 0.2, "flops": {"float32": 4 * 10**9, "bfloat16": 10**9}}  # fp32 main; bf16 alone takes 0.25 s
    raised = raised_peaks(run, {"float32": 1.0, "bfloat16": 4.0})
    assert raised == pytest.approx({"float32": 21.25, "bfloat16": 85.0})  # both x (4 + 0.25) / 0.2
    assert flop_bound_seconds(run["flops"], raised) == pytest.approx(0.2)
