"""Benchmark harness behind ``ovss bench`` and ``benchmarks/*.py``: what users run, each in a fresh process.

Every measurement is a *job* (a JSON-able dict) run by :func:`measure` in a fresh interpreter
(``python -m ovss.cli.bench_harness JOB``) with ``--threads`` torch threads. The child loads with ``ovss.load`` exactly
as a user does and reports seconds, windows, matrix-product FLOPs (per dtype) and its peak resident set
read from the OS (``VmHWM`` of ``/proc/self/status``, else ``ru_maxrss``). Three kinds of job:

* ``image``: ``set_image`` + ``predict`` (random unit text embeddings, so no text encoding) on one image, on the
  job's ``device``; one warm-up run, whose matrix products are counted, then the median of ``repeats`` timed runs,
  each checked for other processes' CPU load and redone when disturbed (:mod:`ovss.cli.bench_machine`); on a GPU
  synchronised, with the peak GPU memory allocated and reserved after loading.
* ``text``: ``Segmenter.encode_names`` on 20 names, twice in the same process (cold, then warm).
* ``peaks``: the machine's best matrix-product rate (GFLOP/s) per dtype, for the FLOP-bound time
  (:func:`ovss.cli.bench_machine.peaks_job`).

:func:`measure_many` runs a list of image jobs, each in its own process, or (``one_process=True``, what
``ovss bench --quick`` does: a smoke test) all in one fresh process, which saves an interpreter start and a torch
import per job; there the peak RSS of a job is the process's peak since that job started, not its own.

Weights: the registered files each method asks for when cached, else random stand-ins of the same shapes
(:mod:`ovss.cli.bench_weights`; time and memory do not depend on the values), tiny ones with ``quick``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ovss.cli.bench_machine import DeviceTimer, QuietPolicy, is_disturbed, peaks_job, proc_load_source, timed_runs
from ovss.errors import OvssError

GIB = 2.0**30
TEXT_NAMES = (  # the 20 names of the text timing
    "person", "car", "sky", "road", "tree", "building", "grass", "dog", "cat", "bicycle",
    "bus", "train", "boat", "bird", "horse", "chair", "table", "bottle", "flower", "wall",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------- in the child
def peak_rss_bytes() -> int:
    """Peak resident set of this process from the OS: VmHWM (Linux), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux ``clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class MatmulFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """Count the FLOPs of matrix products, convolutions and fused attention, per input dtype.

    Uses PyTorch's own formulas (``torch.utils.flop_counter``) and adds CPU fused attention
    (``4 * B * H * n * m * d``), which that registry lacks; a sparse x dense product counts its stored
    entries only (the registry would count it as dense). Element-wise work is not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.flops: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if "scaled_dot_product" in str(packet):  # fused attention: counted, run as is (not decomposed)
            q, k = args[0], args[1]  # (B, H, n, d), (B, H, m, d)
            n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
            self.flops[str(q.dtype).replace("torch.", "")] += 4 * math.prod(q.shape[:-2]) * n * m * d
            return func(*args, **kwargs)
        if packet not in self.registry:  # composites (linear, matmul, einsum) run as the products they are
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        sparse = [a for a in args if isinstance(a, torch.Tensor) and a.layout != torch.strided]
        if sparse and out.dim() == 2:  # sparse x dense (GLA's proxy means): 2 FLOPs per stored entry and column
            flops = 2 * sparse[0]._nnz() * (out.shape[1] if sparse[0] is args[0] else out.shape[0])
        else:
            flops = int(self.registry[packet](*args, **kwargs, out_val=out))
        self.flops[str(dtype).replace("torch.", "")] += flops
        return out


def bench_image(spec: str) -> Any:
    """The test image: ``"HxW"`` random pixels, ``"astronaut"`` (scikit-image), else a file path (read per run)."""
    import numpy as np

    if Path(spec).is_file():
        return spec  # read by set_image, inside the timed run
    if spec == "astronaut":
        from skimage.data import astronaut

        return astronaut()  # (512, 512, 3) uint8
    h, w = (int(s) for s in spec.split("x"))
    return np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)  # (h, w, 3)


def quick_settings(method: str, settings: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """A method's settings in a ``--quick`` smoke run: the small geometry, except where the method's own checks
    need another (Trident: windows a multiple of 16 pixels); what the user set wins."""
    from ovss.methods.registry import get_method

    if get_method(method).windowing == "canvas":  # Trident's canvas: crop a multiple of 16 (check_trident)
        return {**settings, "crop": 64, "stride": 32, **user}
    return settings


def _load(job: dict[str, Any], method: str) -> Any:
    """``ovss.load`` of a job: each role the method needs gets the given file, else the stand-in of its default."""
    import ovss
    from ovss.methods.registry import get_method
    from ovss.storage import hub

    files = job.get("files", {})  # registry name -> random stand-in (ovss bench without real weights)
    clip = job.get("clip") or hub.DEFAULT_CLIP
    roles = {role: job.get(role) or files.get(default, default) for role, default in get_method(method).weights}
    return ovss.load(
        method,
        clip=files.get(clip, clip),
        **roles,
        device=job.get("device", "cpu"),
        dtype=job.get("dtype", "fp32"),
        tokenizer=job.get("tokenizer"),
        download=False,
        **job.get("settings", {}),
    )


def image_job(job: dict[str, Any]) -> dict[str, Any]:
    """Load a method on ``device``, then ``warmup`` (default 1) and ``repeats`` timed ``set_image`` + ``predict`` runs.

    Each timed run is checked for other processes' load (:func:`ovss.cli.bench_machine.timed_runs`, policy from
    the job's ``policy``; ``quiet_check: false`` turns the check off); on a GPU the runs are synchronised and
    the peak GPU memory after loading is read. Without a warm-up (``warmup: 0``) no FLOPs are counted.
    """
    import numpy as np
    import torch.nn.functional as F

    device = torch.device(job.get("device", "cpu"))
    timer = DeviceTimer(device)
    start = time.perf_counter()
    seg = _load(job, job["method"])
    timer.sync()
    load_seconds = time.perf_counter() - start
    load_peak = peak_rss_bytes()
    run_peak_only = reset_peak_rss()
    timer.start()
    image = bench_image(job["image"])
    n = int(job.get("classes", len(TEXT_NAMES)))
    labels = [f"class {i}" for i in range(n)]
    E = seg.clip.visual.cfg.output_dim
    text = F.normalize(torch.randn(n, E, generator=torch.Generator().manual_seed(0)), dim=-1).to(device)  # (Q, E)
    warmup = int(job.get("warmup", 1))
    counter = MatmulFlops() if job.get("count_flops", True) and warmup > 0 else None  # the first warm-up run
    last: list[Any] = []

    def one_run() -> None:
        seg.set_image(image)
        pred = seg.predict(labels=labels, text_embeddings=text)
        if job.get("logits"):  # also build the full-resolution logits, as --save-logits does
            pred.maps.logits({"fp16": torch.float16, "fp32": torch.float32}[job["logits"]])
        timer.sync()
        last[:] = [pred]

    warmup_times = []
    for i in range(warmup):
        start = time.perf_counter()
        with counter if i == 0 and counter is not None else contextlib.nullcontext():
            one_run()
        warmup_times.append(time.perf_counter() - start)
    load = proc_load_source([os.getpid(), os.getppid()]) if job.get("quiet_check", True) else None
    timing = timed_runs(one_run, int(job.get("repeats", 3)), QuietPolicy(**job.get("policy", {})), load)
    if job.get("labels_out"):
        np.save(job["labels_out"], last[0].labels.cpu().numpy())
    run_peak = peak_rss_bytes()
    return {
        "method": job["method"],
        "precision": job.get("dtype", "fp32"),
        "device": str(device),
        "image": "x".join(str(side) for side in seg.current_image().shape[:2]),
        "windows": len(seg.current_windows()[0]),
        "seconds": statistics.median(timing["seconds"]),
        "seconds_all": timing["seconds"],
        "warmup_seconds": warmup_times[0] if warmup_times else None,
        "load_seconds": load_seconds,
        "quiet_check": load is not None,
        "background_cores": timing["background_cores"],
        "disturbed_runs": timing["disturbed_runs"],
        "redone": timing["redone"],
        "redone_seconds": timing["redone_seconds"],
        "flops": dict(counter.flops) if counter is not None else {},
        "load_peak_rss_bytes": load_peak,
        "run_peak_rss_bytes": run_peak if run_peak_only else None,
        "peak_rss_bytes": max(load_peak, run_peak),
        **timer.memory(),
    }


def text_job(job: dict[str, Any]) -> dict[str, Any]:
    """``encode_names`` on the 20 names twice in this process: first (cold) and second (warm) seconds, and the
    other processes' load during each (cores; None without ``/proc``)."""
    seg = _load(job, "clearclip")  # the text tower does not depend on the method
    timer = DeviceTimer(torch.device(job.get("device", "cpu")))
    load = proc_load_source([os.getpid(), os.getppid()])
    policy = QuietPolicy(**job.get("policy", {}))
    times, background, disturbed = [], [], []
    for _ in range(2):
        before = load() if load is not None else 0.0
        start = time.perf_counter()
        seg.encode_names(list(TEXT_NAMES))
        timer.sync()
        times.append(time.perf_counter() - start)
        other = load() - before if load is not None else None
        background.append(other / times[-1] if other is not None else None)
        disturbed.append(other is not None and is_disturbed(other, times[-1], policy))
    return {
        "first_seconds": times[0],
        "second_seconds": times[1],
        "templates": seg.pipeline.templates,
        "background_cores": background,
        "disturbed": disturbed,
    }


JOBS = {"image": image_job, "text": text_job, "peaks": peaks_job}
STARTED = "started"  # key of the line a one-process batch prints before each of its jobs
# Smoke runs (``ovss bench --quick``): waiting OpenMP threads sleep instead of spinning. Tiny models run thousands
# of short parallel regions; spinning threads on a loaded 2-core machine stalled a quick run for 10 minutes.
SMOKE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def child_main(argv: list[str]) -> None:
    """Entry point of a measurement process: ``python -m ovss.cli.bench_harness JOB_JSON``; prints the result as JSON.

    A ``batch`` job (``{"kind": "batch", "threads": t, "jobs": [...]}``) runs its jobs one after the other in
    this process and prints two JSON lines per job as it goes: ``{"started": i}``, then the job's result.
    """

    job = json.loads(argv[0])
    torch.set_num_threads(int(job["threads"]))
    try:
        if job["kind"] == "batch":
            for i, one in enumerate(job["jobs"]):
                print(json.dumps({STARTED: i}), flush=True)
                reset_peak_rss()  # the peak since this job started (the earlier jobs' models are still held)
                print(json.dumps(JOBS[one["kind"]](one)), flush=True)
            return
        result = JOBS[job["kind"]](job)
    except OvssError as error:  # a user-facing problem (missing weights, a setting the method refuses): one line
        sys.exit(f"ovss: error: {error}")
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------------- in the parent
class MeasurementError(RuntimeError):
    """A measurement process failed; the message holds the end of its stderr."""


def _child_env(threads: int, env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a measurement process: this ovss on its path, ``threads`` OpenMP / MKL threads."""
    src = str(Path(__file__).resolve().parents[1])  # the ovss that runs this, also in the child
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    child_env = {**os.environ, **(env or {}), "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}
    child_env["MKL_NUM_THREADS"] = str(threads)
    return child_env


def _failure(job: dict[str, Any], stderr: str) -> MeasurementError:
    """The error of a failed measurement: the child's one-line ovss error, else the end of its stderr."""
    what = job.get("method", job["kind"])
    lines = stderr.strip().splitlines() or ["(no output)"]
    last = lines[-1] if lines[-1].startswith("ovss: error: ") else "\n".join(lines[-8:])
    return MeasurementError(f"measurement {what} ({job.get('dtype', 'fp32')}) failed:\n{last}")


def measure(job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one job in a fresh interpreter with ``job["threads"]`` threads and return what it reports.

    Raises:
        MeasurementError: the process exited with an error (its stderr's last lines are in the message).
    """
    out = subprocess.run(
        [sys.executable, "-m", "ovss.cli.bench_harness", json.dumps(job)],
        capture_output=True,
        text=True,
        env=_child_env(int(job["threads"]), env),
    )
    if out.returncode != 0:
        raise _failure(job, out.stderr)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def measure_many(
    jobs: list[dict[str, Any]],
    one_process: bool = False,
    started: Callable[[int, dict[str, Any]], None] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run jobs one after the other and yield each result as soon as it is measured.

    Args:
        jobs: jobs of one thread count (``jobs[0]["threads"]``).
        one_process: all jobs in one fresh interpreter (a smoke test: no interpreter start per job; peak RSS
            is the process's peak since the job started); else one fresh interpreter per job.
        started: called with (index, job) when a job starts, e.g. to print progress.
        env: extra environment variables of the measurement processes (e.g. :data:`SMOKE_ENV`).

    Raises:
        MeasurementError: a measurement process exited with an error.
    """
    if not one_process:
        for i, job in enumerate(jobs):
            if started is not None:
                started(i, job)
            yield measure(job, env)
        return
    if not jobs:
        return
    batch = {"kind": "batch", "threads": jobs[0]["threads"], "jobs": jobs}
    command = [sys.executable, "-m", "ovss.cli.bench_harness", json.dumps(batch)]
    child_env = _child_env(int(batch["threads"]), env)
    current = 0
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: the child never blocks on a full stderr
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=child_env) as child:
            assert child.stdout is not None
            for line in child.stdout:
                message = json.loads(line)
                if STARTED in message and len(message) == 1:
                    current = int(message[STARTED])
                    if started is not None:
                        started(current, jobs[current])
                else:
                    yield dict(message)
        if child.returncode != 0:
            errors.seek(0)
            raise _failure(jobs[current], errors.read())


if __name__ == "__main__":
    child_main(sys.argv[1:])
