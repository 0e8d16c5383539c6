"""What ``ovss bench`` prints: the header, one Markdown row per result, the peak settling and the GPU comparison.

Pure functions over the measurement records (:mod:`ovss.cli.bench_harness`), so the layout is tested without timing.
A result that kept a run disturbed by other processes is never printed as a clean number: its time and ratio
carry a ``~`` and the count of disturbed runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ovss.cli.bench_machine import flop_bound_seconds, raised_peaks

GIB = 2.0**30
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# GLA-CLIP (Lee et al., "Looking Beyond the Window: Global-Local Aligned CLIP for Training-free Open-Vocabulary
# Semantic Segmentation"), Table 11: cost on PASCAL Context 59 in the SCLIP setting, image 336x497, crop 224, one
# NVIDIA RTX A6000. Rows: (label, ovss method, windows, seconds per image, memory in GB as the paper prints it).
PAPER_TABLE11 = (
    ("CASS", "cass", 1, 5.799, 7.6),
    ("ProxyCLIP (baseline)", "proxyclip", 8, 0.429, 1.8),
    ("GLA, stride 224", "proxyclip+gla", 6, 0.415, 1.7),
    ("GLA, stride 112", "proxyclip+gla", 8, 0.431, 1.9),
    ("GLA, stride 98", "proxyclip+gla", 12, 0.441, 2.4),
)
PAPER_SETTING = "--size 336x497 --set short_side=336 --set crop=224 --set stride=112 (98 or 224 for the GLA rows)"


def peaks_line(peaks: dict[str, Any]) -> str:
    """The matmul peaks for the header: rates per dtype and how they were measured."""
    sizes = peaks["sizes"]
    rates = []
    for dtype, rate in peaks["gflops"].items():
        detail = peaks["detail"].get(dtype, {})
        mark = f" (at {detail['size']}³)" if detail.get("size") else ""
        if detail.get("disturbed_runs"):
            mark += f" (~: {detail['disturbed_runs']} disturbed runs kept)"
        rates.append(f"{DTYPE_NAMES.get(dtype, dtype)} {rate:.0f}{mark}")
    return (
        f"matmul peak (best square product of {sizes[0]}³ to {sizes[-1]}³, {peaks['repeats']} timed runs each, "
        f"{peaks['threads']} threads): {', '.join(rates)} GFLOP/s"
    )


def table_head(gpu: bool) -> str:
    """The Markdown head of the results table (GPU memory columns on a GPU)."""
    cols = ["method", "precision", "image", "windows", "s / image", "redone", "others (cores)"]
    if gpu:
        cols.append("GPU peak alloc / reserved (GiB)")
    cols += ["peak RSS (GiB)", "GFLOP", "FLOP-bound (s)", "× bound"]
    return f"| {' | '.join(cols)} |\n|{'---|' * len(cols)}"


def with_bound(run: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    """The run with its FLOP-bound time and ratio at ``peaks`` (GFLOP/s per dtype)."""
    bound = flop_bound_seconds(run["flops"], peaks) if run["flops"] else 0.0
    return {**run, "flop_bound_seconds": bound, "bound_ratio": run["seconds"] / bound if bound > 0 else None}


def settle_peaks(
    run: dict[str, Any], peaks: dict[str, float], remeasure: Callable[[], dict[str, float]] | None
) -> tuple[dict[str, float], str | None]:
    """Peaks under which ``run`` is not faster than its FLOP bound (× bound >= 1), and a note when they changed.

    A run faster than its bound means the peaks were measured too low: they are measured again
    (``remeasure``, a fresh measurement; None: not) and the better of both kept; if the run still beats the bound,
    the peak of its main dtype is raised to the rate the run itself reached (:func:`raised_peaks`).
    """
    if not run["flops"] or run["seconds"] >= flop_bound_seconds(run["flops"], peaks):
        return peaks, None
    before = dict(peaks)
    if remeasure is not None:
        fresh = remeasure()
        peaks = {d: max(rate, fresh.get(d, 0.0)) for d, rate in peaks.items()}
    settled = raised_peaks(run, peaks)
    how = "measured again" if settled == peaks and remeasure is not None else "raised to the rate it reached"
    changes = ", ".join(
        f"{DTYPE_NAMES.get(d, d)} {before[d]:.0f} -> {rate:.0f}" for d, rate in settled.items() if rate != before[d]
    )
    return settled, f"{run['method']} {run['precision']} beat the FLOP bound: peaks {how} ({changes} GFLOP/s)"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def seconds_cell(r: dict[str, Any], digits: int = 3) -> str:
    """A result's seconds per image; ``~`` and the disturbed count where it kept runs other processes disturbed."""
    if not r["disturbed_runs"]:
        return f"{r['seconds']:.{digits}f}"
    return f"~{r['seconds']:.{digits}f} (disturbed {r['disturbed_runs']}/{len(r['seconds_all'])})"


def row(r: dict[str, Any]) -> str:
    """One Markdown row of an image result; ``~`` marks a result that kept runs disturbed by other processes."""
    mark = "~" if r["disturbed_runs"] else ""
    seconds = seconds_cell(r)
    background = [b for b in r["background_cores"] if b is not None]
    others = f"{max(0.0, max(background)):.2f}" if background else "n/a"
    cols = [r["method"], r["precision"], r["image"], str(r["windows"]), seconds, str(r["redone"]), others]
    if r.get("gpu_peak_allocated_bytes") is not None:
        cols.append(f"{_gib(r['gpu_peak_allocated_bytes'])} / {_gib(r['gpu_peak_reserved_bytes'])}")
    gflop = sum(r["flops"].values()) / 1e9
    ratio = f"{mark}{r['bound_ratio']:.2f}×" if r["bound_ratio"] else "-"
    bound = f"{r['flop_bound_seconds']:.3f}" if r["flops"] else "-"
    cols += [f"{r['peak_rss_bytes'] / GIB:.2f}", f"{gflop:.1f}", bound, ratio]
    return f"| {' | '.join(cols)} |"


def summary_line(runs: list[dict[str, Any]], quiet_check: bool) -> str:
    """How many runs were redone and which results stayed disturbed."""
    if not quiet_check:
        return "quiet check unavailable: no run was checked for other processes' load"
    redone = sum(r["redone"] for r in runs)
    marked = [f"{r['method']} {r['precision']}" for r in runs if r["disturbed_runs"]]
    line = f"{redone} timed run(s) redone because other processes used the CPU"
    if marked:
        return line + f"; still disturbed after the redo limit (marked ~, not clean numbers): {', '.join(marked)}"
    return line + "; every result in the table comes from undisturbed runs"


def paper_comparison(runs: list[dict[str, Any]]) -> list[str]:
    """ovss's GPU results next to GLA-CLIP's Table 11 (A6000, PC59): time and memory ratios per matching row.

    A result matches the rows of its method; where one of them has the result's window count, only that one.
    """
    lines = [
        "GLA-CLIP paper, Table 11 (NVIDIA RTX A6000, PASCAL Context 59 in the SCLIP setting, image 336x497, "
        f"crop 224); the same setting here: {PAPER_SETTING}. Target: at most 0.5× the time at no more memory.",
        "",
        "| method | precision | windows | ovss s / image | ovss GPU peak (GiB) | paper row | paper s / image "
        "| paper GB | time ratio | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    found = False
    for r in runs:
        rows = [p for p in PAPER_TABLE11 if p[1] == r["method"]]
        same = [p for p in rows if p[2] == r["windows"]]
        for label, _method, windows, seconds, gb in same or rows:
            found = True
            peak = r.get("gpu_peak_allocated_bytes")
            mark = "~" if r["disturbed_runs"] else ""
            memory = "-" if peak is None else f"{peak / GIB / gb:.2f}×"
            lines.append(
                f"| {r['method']} | {r['precision']} | {r['windows']} | {mark}{r['seconds']:.3f} | {_gib(peak)} "
                f"| {label} ({windows} windows) | {seconds:.3f} | {gb:.1f} | {mark}{r['seconds'] / seconds:.2f}× "
                f"| {memory} |"
            )
    if not found:
        lines.append("| (none of cass, proxyclip, proxyclip+gla was measured) | | | | | | | | | |")
    return lines
