"""The README's commands work as written: its round-trip block runs top to bottom.

The block is read from README.md itself (the fenced block after "A full round trip"),
so the test follows the README. Only sizes are shrunk for CI (image side, image counts,
epochs, frames), by replacing the numbers after those flags; every command, flag and
path is the README's own. Each command runs as its console script in a fresh folder.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# flag -> value used in CI (the README uses full sizes)
SMALL = {"--size": "64", "--train": "12", "--val": "20", "--test-good": "3", "--test-defect": "1",
         "--epochs": "2", "--frames": "12"}


def readme_round_trip() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("A full round trip")
    block = re.search(r"\n((?:    \S.*\n)+)", text[start:])
    assert block, "README: no indented command block after 'A full round trip'"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def shrink(command: str) -> list[str]:
    args = shlex.split(command)
    for i, arg in enumerate(args[:-1]):
        if arg in SMALL:
            args[i + 1] = SMALL[arg]
    return args


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_round_trip_runs_as_written(tmp_path):
    commands = readme_round_trip()
    tools = [shlex.split(c)[0] for c in commands]
    assert tools[:2] == ["edge-synth", "edge-train"] and "edge-run" in tools
    env = {**os.environ, "EDGE_RUNTIME_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "2"}
    bindir = Path(sys.executable).parent
    for command in commands:
        args = shrink(command)
        exe = shutil.which(args[0], path=str(bindir)) or shutil.which(args[0])
        assert exe, f"{args[0]} is not installed (pip install -e .)"
        if args[0] == "edge-synth":
            args += ["--categories", "puck"]  # one category is enough for the round trip in CI
        if args[0] == "edge-run" and "--frames" not in args:
            args += ["--frames", SMALL["--frames"]]
        if args[0] == "edge-run" and "--alerts" not in args:
            # OS-chosen ports: the README's default 5556 / 5557 would clash with any other
            # station (or a second test run) on this machine; the ports are not under test
            args += ["--alerts", "tcp://127.0.0.1:*", "--replay-endpoint", "tcp://127.0.0.1:*"]
        run = subprocess.run([exe, *args[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, f"README command failed: {command}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
