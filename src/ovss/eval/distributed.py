"""The process-group helpers of ``ovss eval``, shared with ``ovss segment``: they live in :mod:`ovss.distributed`."""

from ovss.distributed import (
    SINGLE,
    DistContext,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    backend_for,
    barrier,
    current_context,
    distributed_session,
    launched_by_torchrun,
    rank_device,
)

__all__ = [
    "SINGLE",
    "DistContext",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_sum",
    "backend_for",
    "barrier",
    "current_context",
    "distributed_session",
    "launched_by_torchrun",
    "rank_device",
]
