"""Which images a process of ``ovss segment`` takes, and which process writes the run-level files.

Two ways to split a run, composable:

- ``--shard I/N`` (0-based: ``0 <= I < N``): independent processes, e.g. a SLURM job array
  ``--array=0-3`` with ``--shard $SLURM_ARRAY_TASK_ID/4``. Shard I takes the images at positions
  ``k % N == I`` of the full, ordered job list (the same list in every shard: inputs as given, folders
  sorted). No process group, no communication: shards meet only in the output folder.
- ``torchrun --nproc-per-node R -m ovss segment ...``: rank r takes every R-th image of its shard's list
  (of the whole list without ``--shard``), as ``ovss eval`` does; under ``--shard I/N`` each shard is a
  torchrun job of its own (a job array of multi-GPU jobs).

Per-image files belong to exactly one process, so the union of the shards' outputs is byte-identical to
one process's. The run-level ``config.json`` lists the finished images of the whole run in full-run order:
under torchrun rank 0 writes it once every rank is done; with ``--shard`` each shard records its
outcome in ``<out>/.ovss/shards/<I>-of-<N>.json`` and the shard that finds all N records of the same
configuration and image list (the last to finish) writes it. Two shards finishing at once both write the
same bytes, atomically: harmless.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovss.cli.segment_run import Outcome, SegmentRun, combined, finish_run, summary
from ovss.errors import OvssError

if TYPE_CHECKING:
    from ovss.distributed import DistContext

SHARD_FOLDER = Path(".ovss") / "shards"  # inside the output folder
FORMAT = "ovss-segment-shard"  # the shard record's "format" field


@dataclass(frozen=True)
class Shard:
    """This process's part of a segment run."""

    index: int  # I of --shard I/N, 0-based (0 without --shard)
    count: int  # N of --shard I/N (1 without --shard)
    rank: int  # torchrun rank within the shard (0 without torchrun)
    world: int  # torchrun processes of the shard (1 without torchrun)

    @property
    def split(self) -> bool:
        """Whether other processes segment other images of the same run."""
        return self.count > 1 or self.world > 1

    def positions(self, total: int) -> list[int]:
        """Positions (0-based, in the full ordered job list of ``total`` images) of this process's images."""
        return list(range(self.index, total, self.count))[self.rank :: self.world]

    def name(self) -> str:
        """``shard 1/4`` / ``rank 0/2`` / ``shard 1/4 rank 0/2``, for messages ('' for a whole run)."""
        parts = [f"shard {self.index}/{self.count}"] if self.count > 1 else []
        parts += [f"rank {self.rank}/{self.world}"] if self.world > 1 else []
        return " ".join(parts)


def parse_shard(text: str | None) -> tuple[int, int]:
    """``--shard I/N`` as (I, N); (0, 1) when the flag is absent.

    Raises:
        OvssError: not two integers ``I/N`` with ``0 <= I < N``.
    """
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    index, count = (int(match[1]), int(match[2])) if match else (-1, 0)
    if not 0 <= index < count:
        raise OvssError(
            f"--shard must be I/N with 0 <= I < N (0-based: --shard 0/2 and --shard 1/2 split a run in two; "
            f"a SLURM array --array=0-{max(count, 2) - 1} passes $SLURM_ARRAY_TASK_ID/{max(count, 2)}), got {text!r}"
        )
    return index, count


def record_path(out: Path, index: int, count: int) -> Path:
    """``<out>/.ovss/shards/<I>-of-<N>.json``: the outcome of shard I of N."""
    return out / SHARD_FOLDER / f"{index}-of-{count}.json"


def forget_shard(out: Path, shard: Shard) -> None:
    """Remove this shard's record of an earlier attempt (it is running again: not finished)."""
    record_path(out, shard.index, shard.count).unlink(missing_ok=True)


def inputs_digest(stems: list[str]) -> str:
    """SHA-256 (hex) of the run's full, ordered image list: a shard record of another list is not this run's."""
    return hashlib.sha256("\n".join(stems).encode("utf-8")).hexdigest()


def record_shard(
    out: Path, shard: Shard, key: str, inputs: str, finished: list[str], failed: dict[str, str], skipped: int
) -> None:
    """Record that this shard is done: its finished images (``skipped`` of them from an earlier run) and the
    failed ones with their reasons; ``key`` and ``inputs`` (:func:`inputs_digest`) say which run it belongs to."""
    from ovss.storage.files import save_text

    record = {"format": FORMAT, "config": key, "inputs": inputs, "shard": shard.index, "of": shard.count,
              "finished": finished, "failed": failed, "skipped": skipped}  # fmt: skip
    save_text(record_path(out, shard.index, shard.count), json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def all_shards(out: Path, count: int, key: str, inputs: str) -> list[dict[str, Any]] | None:
    """The records of all ``count`` shards of run ``key`` over the image list ``inputs``, or None while one is
    missing (still running) or left by a run of other images (e.g. files added to the folder since)."""
    records: list[dict[str, Any]] = []
    for index in range(count):
        try:
            record = json.loads(record_path(out, index, count).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("config") != key:
            return None
        if record.get("inputs") != inputs:
            return None
        records.append(record)
    return records



def mixed_run(out: Path, shard: Shard, key: str) -> str | None:
    """A note naming the other shards whose record in ``out`` was made with another configuration than ``key``
    (the run-level files wait until they run again with this one); None when there is none."""
    foreign = []
    for index in range(shard.count):
        try:
            record = json.loads(record_path(out, index, shard.count).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("format") == FORMAT and record.get("config") != key:
            foreign.append(f"{index}/{shard.count}")
    if not foreign:
        return None
    return (
        f"ovss: shard {shard.index}/{shard.count} done, but shard(s) {', '.join(foreign)} in {out} last ran with "
        "another configuration (method, weights, labels or output flags): config.json and coco.json are written "
        "only once they run again with this shard's flags (--overwrite); or use separate --out folders"
    )


def finish_shard(
    args: argparse.Namespace, jobs: list[tuple[str, Any]], shard: Shard, context: DistContext, outcome: Outcome,
    run: SegmentRun,
) -> int:  # fmt: skip
    """Gather the ranks' outcomes to rank 0, which writes the run-level files if the whole run is done and
    prints the summary; every rank returns rank 0's exit code (0: every image of the run finished)."""
    from ovss.distributed import all_gather_objects

    stems = [stem for stem, _ in jobs]
    parts = all_gather_objects(outcome, context)
    stopped = [part.stopped for part in parts if part.stopped is not None]
    if stopped:  # a rank could not write: the run stops, with that rank's one line, once
        if shard.rank == 0:
            raise OvssError(stopped[0])
        return 2
    merged = combined(parts, stems)  # this shard's images, all ranks
    code = _finish_main(args, stems, shard, merged, run) if shard.rank == 0 else 0
    return int(all_gather_objects(code, context)[0])


def _finish_main(args: argparse.Namespace, stems: list[str], shard: Shard, merged: Outcome, run: SegmentRun) -> int:
    """Rank 0's part of :func:`finish_shard`; the exit code of the run (of this shard while other shards run)."""
    whole = merged
    if shard.count > 1:  # --shard: record this shard's outcome; the shard that finds every record finishes the run
        inputs = inputs_digest(stems)
        record_shard(run.out, shard, run.key, inputs, merged.finished, merged.failed, merged.skipped)
        records = all_shards(run.out, shard.count, run.key, inputs)
        scope = f"shard {shard.index}/{shard.count}"
        if not args.quiet:  # each shard's own line (its skipped images: the others' are not known here)
            mine = len(range(shard.index, len(stems), shard.count))  # this shard's images, all its ranks
            print(summary(run.out, merged, mine, scope), file=sys.stderr)
        if records is None:
            mixed = mixed_run(run.out, shard, run.key)  # not "the last shard writes": not with these records
            if mixed is not None:
                print(mixed, file=sys.stderr)
            elif not args.quiet:
                print(f"ovss: {scope} done; the last shard to finish writes {run.out / 'config.json'}", file=sys.stderr)
            return 0 if not merged.failed else 1
        whole = combined([Outcome(r["finished"], r["failed"], r["skipped"]) for r in records], stems)
    if whole.finished:
        finish_run(run, whole.finished, stems)
    if not args.quiet:
        print(summary(run.out, whole, len(stems), "all shards" if shard.count > 1 else ""), file=sys.stderr)
    return 0 if not whole.failed else 1
