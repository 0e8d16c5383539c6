"""The GLA benchmark script runs end to end in quick mode and reports numbers (a smoke test, not a benchmark)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_memory_benchmark_reports_numbers(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gla_bench.py"),
            "memory",
            "--quick",
            "--threads",
            "1",
            "--weights-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| proxyclip")]
    assert [r.split("|")[1].strip() for r in rows] == ["proxyclip", "proxyclip+gla"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "112x224" and int(cells[2]) > 1  # the quick image, several windows
        peak_gib, seconds = float(cells[3]), float(cells[4])
        assert 0.05 < peak_gib < 8 and 0 < seconds < 60  # measured, not placeholders
    assert re.search(r"\| GLA - ProxyCLIP \| \| \| [+-]\d+\.\d\d \(target <= \+2\)", out.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-vitb16-tiny.pt", "dino-vitb8-tiny.pth"]
