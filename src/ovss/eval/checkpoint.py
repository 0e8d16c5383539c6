"""Checkpoints of the benchmark runner: what one rank has done, written atomically and read back on resume.

Each rank keeps a :class:`RunState` (the dataset indices it has predicted and its int64 counts) and writes it to
``out_dir/checkpoint/rank{r}-of-{N}.pt`` with the run's identity, everything that must not change between an
interrupted run and its resumption; a checkpoint of another identity is refused with the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ovss.errors import OvssError
from ovss.eval.ber import BoundaryErrorAccumulator
from ovss.eval.datasets import SegDataset
from ovss.eval.distributed import DistContext
from ovss.eval.metrics import ConfusionAccumulator
from ovss.eval.presets import ResolvedSetting
from ovss.storage.files import atomic_write

CHECKPOINT_DIR = "checkpoint"  # sub-folder of out_dir holding one checkpoint file per rank
_CHECKPOINT_VERSION = 1


@dataclass
class RunState:
    """What one rank has done so far (runtime state, checkpointed)."""

    done: set[int]  # dataset indices already predicted and counted by this rank
    confusion: ConfusionAccumulator  # intersection / prediction / label areas per class
    boundary: BoundaryErrorAccumulator  # BER numerator and denominator
    predict_seconds: float  # time spent predicting, over every session of this run


def run_identity(
    config: Mapping[str, Any], setting: ResolvedSetting, classes: list[list[str]], dataset: SegDataset, band: int
) -> str:
    """Everything that must not change between an interrupted run and its resumption, as JSON."""
    samples = hashlib.sha256("\n".join(dataset.sample_names).encode()).hexdigest()
    keys = ("method", "options", "pipeline", "pad_multiple", "dtype", "clip_fingerprint")
    identity = {key: config.get(key) for key in keys}
    identity.update(dataset=setting.dataset, classes=classes, samples=samples, ber_band=band)
    return json.dumps(identity, sort_keys=True, default=str)


def checkpoint_path(out_dir: Path, context: DistContext) -> Path:
    return out_dir / CHECKPOINT_DIR / f"rank{context.rank}-of-{context.world_size}.pt"


def fresh_state(num_classes: int, band: int, ignore: int = 255) -> RunState:
    return RunState(set(), ConfusionAccumulator(num_classes, ignore), BoundaryErrorAccumulator(band, ignore), 0.0)


def save_checkpoint(path: Path, state: RunState, identity: str) -> None:
    """Write one rank's state atomically (a crash leaves the previous checkpoint intact)."""
    payload = {
        "version": _CHECKPOINT_VERSION,
        "identity": identity,
        "done": sorted(state.done),
        "confusion": state.confusion.state_dict(),
        "boundary": state.boundary.state_dict(),
        "predict_seconds": state.predict_seconds,
    }
    atomic_write(path, lambda temp: torch.save(payload, temp))


def load_checkpoint(path: Path, identity: str, num_classes: int, band: int, ignore: int = 255) -> RunState:
    """Read one rank's state; a checkpoint of another configuration raises an OvssError."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise OvssError(f"checkpoint {path} is unreadable ({error}); drop --resume to start again") from error
    if payload.get("version") != _CHECKPOINT_VERSION or payload.get("identity") != identity:
        old, new = json.loads(payload.get("identity", "{}")), json.loads(identity)
        differ = sorted(key for key in new if old.get(key) != new[key])
        raise OvssError(
            f"checkpoint {path} belongs to another configuration (differs in: {', '.join(differ) or 'version'}); "
            "evaluate into a new --out folder or drop --resume to start again"
        )
    state = fresh_state(num_classes, band, ignore)
    state.done = set(payload["done"])
    state.confusion.load_state_dict(payload["confusion"])
    state.boundary.load_state_dict(payload["boundary"])
    state.predict_seconds = float(payload["predict_seconds"])
    return state
