"""The README's set-up commands and CI run the same thing: README step 2 is CI's command, and it lints every folder."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    """The command lines (comments dropped) of the README's first ```bash block under "## Set up"."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Set up") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _commands(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_has_two_setup_commands_and_the_second_is_what_ci_runs() -> None:
    commands = _setup_commands()
    assert len(commands) == 2, commands
    assert commands[1] == "bash scripts/test.sh"
    assert _commands(REPO / ".ci" / "run")[-1] == "exec bash scripts/test.sh"  # nothing after it, nothing else
    words = {word for line in _commands(REPO / ".ci" / "run") for word in shlex.split(line)}
    assert not words & {"pytest", "pip", "ruff", "mypy", "export", "apt-get"}  # all of it lives in scripts/test.sh


def test_the_test_command_lints_every_python_folder_and_installs_chromium() -> None:
    script = _commands(REPO / "scripts" / "test.sh")
    ruff = [shlex.split(line) for line in script if line.startswith("ruff check")]
    assert len(ruff) == 1
    tops = [p.relative_to(REPO).parts[0] for p in REPO.glob("*/**/*.py")]
    folders = {top for top in tops if not top.startswith(".") and top not in ("build", "dist", "venv")}
    assert set(ruff[0][2:]) == folders  # src tests benchmarks tools: one list, the README's and CI's
    assert any("apt-get install" in line and "chromium" in line for line in script)
    assert "mypy" in script and any(line.startswith("python -m pytest") for line in script)
    assert any("OVSS_OFFLINE=1" in line for line in script)
