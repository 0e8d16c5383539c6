"""The machine under ``ovss bench``: other processes' load, the quiet check, matmul peaks, CPU / GPU description.

Numbers ``ovss bench`` prints must be ones it can stand behind:

* **Other processes' CPU.** A *load source* returns the CPU seconds used so far by every process except the
  benchmark's own (system-wide busy time from ``/proc/stat``, steal included, minus ``utime + stime`` of the
  benchmark's processes from ``/proc/<pid>/stat``). Its increase over a timed run, divided by the run's wall
  time, is the *background load* in cores. A run whose background load exceeds :attr:`QuietPolicy.max_other`
  (beyond one clock tick of measurement resolution) is *disturbed*: it is redone, up to
  :attr:`QuietPolicy.max_redos` times per result; a result that keeps a disturbed run is marked so.
  Where ``/proc`` is missing (macOS, Windows) there is no load source and the check is reported unavailable.
* **Matmul peaks**: the best rate of square products of several sizes (up to 4096³ on a CPU, 8192³ on a GPU),
  several quiet repeats each, with the threads and dtypes of the runs (:func:`peaks_job`).
* **Machine**: CPU model, logical CPUs, the ISA flags that matter (AVX-512, AMX), torch version; GPU name,
  driver and CUDA version on a GPU (:func:`machine_info`, :func:`gpu_info`).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LoadSource = Callable[[], float]  # CPU seconds used so far by other processes (a cumulative counter)
Clock = Callable[[], float]  # seconds (time.perf_counter)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")  # /proc/cpuinfo


@dataclass(frozen=True)
class QuietPolicy:
    """When a timed run counts as disturbed by other processes, and what is done about it."""

    max_other: float = 0.10  # cores other processes may use on average during a run (0.10 = 10 % of one core)
    max_redos: int = 3  # disturbed runs redone per result at most (then kept and marked)
    wait_seconds: float = 60.0  # longest wait for a quiet machine before a measurement (0: no wait)


# ------------------------------------------------------------------------------------------- other processes
def clock_tick() -> float:
    """Seconds per clock tick of ``/proc`` CPU times (1 / ``SC_CLK_TCK``, 0.01 on Linux)."""
    return 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _busy_seconds(stat: Path) -> float:
    """System-wide busy CPU seconds since boot: user, nice, system, irq, softirq and steal of ``/proc/stat``."""
    fields = stat.read_text().splitlines()[0].split()  # "cpu user nice system idle iowait irq softirq steal ..."
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) * clock_tick()


def _process_seconds(pid: int, proc: Path) -> float:
    """``utime + stime`` of a process (all its threads) in seconds; 0 once it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3, utime 14, stime 15
    return (int(fields[11]) + int(fields[12])) * clock_tick()


def proc_load_source(own_pids: Sequence[int], proc: Path = Path("/proc")) -> LoadSource | None:
    """The load source of this machine: CPU seconds of every process but ``own_pids``; None without ``/proc``."""
    stat = proc / "stat"
    if not stat.is_file():
        return None
    pids = tuple(own_pids)

    def other_seconds() -> float:
        return _busy_seconds(stat) - sum(_process_seconds(pid, proc) for pid in pids)

    return other_seconds


def quiet_check_line(load: LoadSource | None, policy: QuietPolicy) -> str:
    """How the runs are checked for other processes' load, for the header."""
    if load is None:
        return "quiet check: unavailable here (no /proc/stat): other processes' load is not measured"
    return (
        f"quiet check: a timed run during which other processes used more than {policy.max_other:.2f} cores "
        f"on average (/proc/stat, one {clock_tick() * 1e3:.0f} ms tick allowed) is redone, up to "
        f"{policy.max_redos} times per result; results that stayed disturbed are marked"
    )


def is_disturbed(other_seconds: float, wall_seconds: float, policy: QuietPolicy) -> bool:
    """Whether others used more than ``policy.max_other`` cores over ``wall_seconds`` (one clock tick allowed)."""
    return other_seconds - clock_tick() > policy.max_other * wall_seconds


def timed_runs(
    run: Callable[[], object],
    repeats: int,
    policy: QuietPolicy,
    load: LoadSource | None,
    clock: Clock = time.perf_counter,
) -> dict[str, Any]:
    """``repeats`` timed calls of ``run``; each disturbed one is redone while the result's redo budget lasts.

    Returns:
        ``seconds`` (the kept runs' wall times), ``background_cores`` (others' mean cores during each kept run;
        None without a load source), ``disturbed`` (per kept run: disturbed, kept because the redo budget ran
        out), ``disturbed_runs`` (their count), ``redone`` (runs done again because they were disturbed) and
        ``redone_seconds`` (those runs' times).
    """
    seconds: list[float] = []
    background: list[float | None] = []
    redone: list[float] = []
    disturbed: list[bool] = []
    while len(seconds) < repeats:
        before = load() if load is not None else 0.0
        start = clock()
        run()
        wall = clock() - start
        other = load() - before if load is not None else None
        bad = other is not None and is_disturbed(other, wall, policy)
        if bad and len(redone) < policy.max_redos:
            redone.append(wall)
            continue
        seconds.append(wall)
        background.append(other / wall if other is not None and wall > 0 else None)
        disturbed.append(bad)
    return {
        "seconds": seconds,
        "background_cores": background,
        "disturbed": disturbed,
        "disturbed_runs": sum(disturbed),
        "redone": len(redone),
        "redone_seconds": redone,
    }


def wait_for_quiet(
    load: LoadSource | None,
    policy: QuietPolicy,
    say: Callable[[str], None],
    interval: float = 1.0,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Wait (at most ``policy.wait_seconds``) until others used at most ``policy.max_other`` cores over ``interval``.

    Returns:
        ``quiet`` (True / False; None without a load source), ``waited_seconds`` and ``background_cores``
        (the last interval's load).
    """
    if load is None:
        return {"quiet": None, "waited_seconds": 0.0, "background_cores": None}
    start = clock()
    said = False
    while True:
        before, t0 = load(), clock()
        sleep(interval)
        cores = (load() - before) / max(clock() - t0, 1e-9)
        waited = clock() - start
        if not is_disturbed(cores * interval, interval, policy):
            if said:
                say(f"quiet after {waited:.0f} s (others {cores:.2f} cores)")
            return {"quiet": True, "waited_seconds": waited, "background_cores": cores}
        if waited >= policy.wait_seconds:
            say(f"not quiet after {waited:.0f} s (others use {cores:.2f} cores): measuring anyway; runs are checked")
            return {"quiet": False, "waited_seconds": waited, "background_cores": cores}
        if not said:
            limit = policy.wait_seconds
            say(f"waiting for a quiet machine: other processes use {cores:.2f} cores (at most {limit:.0f} s)")
            said = True


# ----------------------------------------------------------------------------------------------- matmul peaks
PEAK_SIZES = {"cpu": (1024, 2048, 3072, 4096), "cuda": (1024, 2048, 4096, 8192), "quick": (256, 512)}
PEAK_RUN_SECONDS = 0.25  # each timed peak run repeats its product until it lasts about this long
PEAK_SLOW_SECONDS = 2.0  # a dtype whose single product takes longer stops at that size (e.g. fp16 on a CPU)


def peaks_job(job: dict[str, Any]) -> dict[str, Any]:
    """Best matrix-product rate (GFLOP/s) per dtype: square products of several sizes, ``repeats`` quiet runs each.

    Job keys: ``dtypes`` (torch dtype names, default float32 and bfloat16), ``device`` (default cpu), ``quick``
    (small sizes, one run: a smoke test), ``repeats`` (default 3), ``policy`` (:class:`QuietPolicy` fields).
    Runs in the measurement process, with the runs' thread count.

    Returns:
        ``gflops`` (dtype name -> best GFLOP/s), ``detail`` (per dtype: the size of the best, redone and kept
        disturbed runs), ``sizes``, ``repeats``, ``threads``, ``quiet_check``, ``device`` and ``gpu_info``
        (:func:`gpu_info` on a GPU, else None).
    """
    device = torch.device(job.get("device", "cpu"))
    sizes = PEAK_SIZES["quick" if job.get("quick") else device.type if device.type == "cuda" else "cpu"]
    repeats = 1 if job.get("quick") else int(job.get("repeats", 3))
    policy = QuietPolicy(**job.get("policy", {}))
    load = proc_load_source([os.getpid(), os.getppid()])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates: dict[str, float] = {}
    detail: dict[str, Any] = {}
    for name in job.get("dtypes", ("float32", "bfloat16")):
        dtype = getattr(torch, name)
        best, best_size, redone, disturbed = 0.0, 0, 0, 0
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)  # (n, n)
            b = torch.randn(n, n, device=device).to(dtype)  # (n, n)
            start = time.perf_counter()
            torch.mm(a, b)  # warm-up, and how many products make one timed run
            sync()
            single = time.perf_counter() - start
            count = max(1, math.ceil(PEAK_RUN_SECONDS / max(single, 1e-6)))

            def products(a: torch.Tensor = a, b: torch.Tensor = b, count: int = count) -> None:
                for _ in range(count):
                    torch.mm(a, b)
                sync()

            timing = timed_runs(products, repeats, policy, load)
            redone += timing["redone"]
            clean = [t for t, bad in zip(timing["seconds"], timing["disturbed"], strict=True) if not bad]
            disturbed += len(timing["seconds"]) - len(clean)
            rate = 2 * n**3 * count / min(clean or timing["seconds"]) / 1e9  # a disturbed best only when all were
            if rate > best:
                best, best_size = rate, n
            if single > PEAK_SLOW_SECONDS:
                break
        rates[name] = best
        detail[name] = {"size": best_size, "redone": redone, "disturbed_runs": disturbed}
    out = {"gflops": rates, "detail": detail, "sizes": list(sizes), "repeats": repeats}
    out.update(threads=torch.get_num_threads(), quiet_check=load is not None, device=str(device))
    return {**out, "gpu_info": gpu_info(device) if device.type == "cuda" else None}


# --------------------------------------------------------------------------------------- FLOP-bound times
def flop_bound_seconds(flops: dict[str, int], peaks: dict[str, Any]) -> float:
    """The time the counted products would take at the measured peak rates (GFLOP/s per dtype name).

    A dtype without its own peak is counted at the bf16 rate (fp16 on a CPU measured without an fp16 peak).
    """
    total = 0.0
    for dtype, count in flops.items():
        rate = float(peaks.get(dtype) or peaks["bfloat16"])
        total += count / (rate * 1e9)
    return total


def raised_peaks(run: dict[str, Any], peaks: dict[str, Any]) -> dict[str, Any]:
    """Peaks no lower than what ``run`` itself reached: a run can never beat the machine's real peak.

    Where the run's time is below its FLOP-bound time, the peak of its main dtype (the one with the most
    counted products) is raised to the rate at which those products fit the rest of the time (the other
    dtypes at their peaks); otherwise ``peaks`` is returned unchanged.
    """
    flops, seconds = run["flops"], float(run["seconds"])
    if not flops or flop_bound_seconds(flops, peaks) <= seconds:
        return peaks
    main = max(flops, key=lambda d: flops[d])
    others = flop_bound_seconds({d: c for d, c in flops.items() if d != main}, peaks)
    left = seconds - others
    if left <= 0:  # the other dtypes alone exceed the time: raise every rate by the same factor
        factor = flop_bound_seconds(flops, peaks) / seconds
        return {**peaks, **{d: float(peaks.get(d) or peaks["bfloat16"]) * factor for d in flops}}
    return {**peaks, main: max(float(peaks.get(main) or 0.0), flops[main] / left / 1e9)}


# ------------------------------------------------------------------------------------------------ machine
def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model name (``/proc/cpuinfo``, else ``sysctl`` on macOS, else :func:`platform.processor`)."""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    brand = _sysctl_brand() if platform.system() == "Darwin" else None
    return brand or platform.processor() or platform.machine() or "unknown"


def _sysctl_brand() -> str | None:
    """macOS's CPU brand string (``sysctl -n machdep.cpu.brand_string``); None where it cannot be read."""
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def isa_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str] | None:
    """Which of :data:`ISA_FLAGS` the CPU has (``/proc/cpuinfo``); None where that file is missing."""
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [flag for flag in ISA_FLAGS if flag in have]
    return None


def machine_info(threads: int) -> dict[str, Any]:
    """The CPU side of the record: model, logical CPUs (available to this process), threads, ISA, versions."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": available,
        "threads": threads,
        "isa": isa_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": platform.system(),
    }


def gpu_info(device: torch.device) -> dict[str, Any]:
    """The GPU side of the record (in the measurement process): name, memory, driver and CUDA versions."""
    props = torch.cuda.get_device_properties(device)
    driver = None
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]  # one driver for all GPUs
        out = subprocess.run(query, capture_output=True, text=True, timeout=20)
        lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
        driver = lines[0].strip() if lines else None
    except (OSError, subprocess.TimeoutExpired):
        driver = None
    return {
        "gpu": props.name,
        "gpu_memory_bytes": props.total_memory,
        "driver": driver,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """The machine for the header: CPU model, CPUs and threads, ISA, torch; the GPU when there is one."""
    isa = machine["isa"]
    amx = [f for f in (isa or []) if f.startswith("amx")]
    flags = "ISA unknown" if isa is None else f"ISA {' '.join(isa) or 'none of avx2/avx512/amx'}"
    if isa is not None and not amx:
        flags += " (no AMX)"
    line = (
        f"machine: {machine['cpu']}, {machine['cpus_available']} of {machine['logical_cpus']} logical CPUs, "
        f"{machine['threads']} threads; {flags}; torch {machine['torch']} ({machine['torch_cpu_capability']})"
    )
    if machine.get("gpu"):
        gib = machine["gpu_memory_bytes"] / 2**30
        line += (
            f"\ngpu: {machine['gpu']} ({gib:.0f} GiB), driver {machine['driver'] or 'unknown'}, "
            f"CUDA {machine['cuda']}"
        )
    return line


class DeviceTimer:
    """Synchronised timing and GPU memory of the runs on one device (no-ops on a CPU).

    On a CUDA device, :meth:`sync` waits for the queued kernels (a run's time is its work's, not its launch's),
    :meth:`start` resets the peak-memory counters after loading, and :meth:`memory` reads them after the runs.
    ``cuda`` is the ``torch.cuda`` module (a stand-in in tests).
    """

    def __init__(self, device: torch.device, cuda: Any = None) -> None:
        self.cuda = (cuda or torch.cuda) if device.type == "cuda" else None
        self.device = device
        self.loaded_bytes: int | None = None

    def sync(self) -> None:
        if self.cuda is not None:
            self.cuda.synchronize(self.device)

    def start(self) -> None:
        """After loading: remember the memory the model holds, reset the peak counters."""
        if self.cuda is not None:
            self.sync()
            self.loaded_bytes = int(self.cuda.memory_allocated(self.device))
            self.cuda.reset_peak_memory_stats(self.device)

    def memory(self) -> dict[str, int | None]:
        """GPU memory since :meth:`start`: peak allocated and reserved bytes (None each on a CPU)."""
        if self.cuda is None:
            return {"gpu_loaded_bytes": None, "gpu_peak_allocated_bytes": None, "gpu_peak_reserved_bytes": None}
        self.sync()
        return {
            "gpu_loaded_bytes": self.loaded_bytes,
            "gpu_peak_allocated_bytes": int(self.cuda.max_memory_allocated(self.device)),
            "gpu_peak_reserved_bytes": int(self.cuda.max_memory_reserved(self.device)),
        }
