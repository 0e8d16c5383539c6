"""Multi-process runs: process-group set-up from ``torchrun``'s environment, sums and gathers across ranks.

Launch ``torchrun --nproc-per-node N -m ovss eval ...`` (or ``... -m ovss segment ...``): every process
takes the images i with ``i % N == rank``; ``eval`` sums its integer counts at the end (exact), ``segment``
gathers the finished and failed images. Without ``torchrun`` everything runs in one process and no process
group is created. The backend is ``gloo`` on CPU and ``nccl`` when the device is CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ovss.errors import OvssError

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int  # this process, 0..world_size-1
    world_size: int  # number of processes (1: not distributed)
    local_rank: int  # process index on this machine (the GPU it uses under torchrun)
    backend: str | None  # "gloo" or "nccl"; None without a process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes results and shows progress."""
        return self.rank == 0


SINGLE = DistContext(rank=0, world_size=1, local_rank=0, backend=None)


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the process was started by ``torchrun`` (RANK and WORLD_SIZE are set)."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


def current_context() -> DistContext:
    """The context of an already initialised default process group, or :data:`SINGLE`."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, str(dist.get_backend()))


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: torch.device | str, context: DistContext) -> torch.device:
    """The device of this rank: a bare ``cuda`` becomes ``cuda:<local_rank>``; others are unchanged."""
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is None and context.world_size > 1:
        return torch.device("cuda", context.local_rank)
    return chosen


def _torchrun_environment(environ: Mapping[str, str]) -> tuple[int, int, int]:
    missing = [name for name in _TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise OvssError(
            f"distributed launch is missing the environment variable(s) {', '.join(missing)}; "
            "start with `torchrun --nproc-per-node N -m ovss eval ...` (or `... -m ovss segment ...`)"
        )
    try:
        rank, world_size, local_rank = (int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as error:
        raise OvssError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {error}") from error
    if not 0 <= rank < world_size:
        raise OvssError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world_size})")
    return rank, world_size, local_rank


@contextmanager
def distributed_session(device: torch.device | str = "cpu") -> Iterator[DistContext]:
    """Join the process group of a ``torchrun`` launch for the duration of a ``with`` block.

    Reuses a process group the caller already initialised (and leaves it alone on exit); creates one
    from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT when launched by ``torchrun`` with
    more than one process (and destroys it on exit, also after an error); otherwise yields
    :data:`SINGLE`.

    Args:
        device: the run's device; CUDA selects the ``nccl`` backend (and this rank's GPU).

    Yields:
        This process's :class:`DistContext`.

    Raises:
        OvssError: incomplete or inconsistent torchrun environment.
    """
    if dist.is_available() and dist.is_initialized():
        yield current_context()
        return
    if not launched_by_torchrun():
        yield SINGLE
        return
    rank, world_size, local_rank = _torchrun_environment(os.environ)
    if world_size == 1:
        yield SINGLE
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    try:
        yield DistContext(rank, world_size, local_rank, backend)
    finally:
        dist.destroy_process_group()


def _reduce(tensor: torch.Tensor, context: DistContext, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    if context.world_size == 1:
        return tensor.clone()
    work = tensor.detach().clone()
    if context.backend == "nccl":
        work = work.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(work, op=op)
    return work.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Element-wise sum over all ranks (a new tensor on the input's device; int64 sums are exact)."""
    return _reduce(tensor, context, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Element-wise maximum over all ranks (a new tensor on the input's device)."""
    return _reduce(tensor, context, dist.ReduceOp.MAX)


def barrier(context: DistContext) -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if context.world_size > 1:
        dist.barrier()


def all_gather_objects(value: Any, context: DistContext) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank (``[value]`` in a single process)."""
    if context.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered
