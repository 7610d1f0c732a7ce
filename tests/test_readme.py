"""README.md as a newcomer meets it: every ```python block runs as written, in order, on a CPU.

The blocks run in one fresh interpreter (a subprocess in a temporary folder), each compiled under
its README line number so a traceback points at the README; a block that raises fails the test.
Shell commands the README names are checked cheaply: the setup and test commands are the ones
.ci/run runs, every script it names exists and accepts the flags it is shown with, and every
relative link points at a file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

RUNNER = r"""
import json, sys
namespace = {"__name__": "__readme__"}
for line, source in json.load(open(sys.argv[1])):
    print(f"--- README.md block at line {line}", flush=True)
    exec(compile("\n" * (line - 1) + source, "README.md", "exec"), namespace)
"""


def blocks(language: str) -> list[tuple[int, str]]:
    """(line of the block's first code line, code) of every ```language block of README.md."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def test_every_python_block_runs_in_order(tmp_path):
    code = blocks("python")
    assert len(code) >= 6, f"expected the README's python blocks, found {len(code)}"
    (tmp_path / "blocks.json").write_text(json.dumps(code))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "runner.py", "blocks.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"a README block failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("--- README.md block") == len(code)
    assert (tmp_path / "routing.json").exists() and (tmp_path / "routing.png").exists()


def test_setup_and_test_commands_are_the_ones_ci_runs():
    shell = "\n".join(code for _, code in blocks("bash"))
    ci = (ROOT / ".ci" / "run").read_text().replace("--quiet ", "")
    for command in ('pip install torch==2.13.0 -e ".[dev]"', "python examples/quickstart.py", "python -m pytest"):
        assert command in shell, f"README's commands lack {command!r}"
        assert command in ci, f".ci/run lacks the README's {command!r}"
    assert "python3 -m venv .venv" in shell


def test_named_scripts_exist_and_take_the_flags_shown():
    text = README.read_text()
    calls = re.findall(r"python (\S+\.py)((?: --[\w-]+(?: [^\s`-]\S*)?)*)", text)
    calls += re.findall(r"torchrun(?: --[\w-]+ \S+)* (\S+\.py)()", text)
    assert calls, "no script found in the README"
    for script, args in calls:
        path = ROOT / script
        assert path.is_file(), f"README names {script}, which does not exist"
        source = path.read_text()
        for flag in re.findall(r"--[\w-]+", args):
            assert f'"{flag}"' in source, f"README runs {script} with {flag}, which it does not define"
    help_run = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--help"],
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                              capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--steps" in help_run.stdout, help_run.stderr


def test_relative_links_point_at_files_and_headings():
    for target, anchor in re.findall(r"\]\(([^)#:]+)(?:#([^)]*))?\)", README.read_text()):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
        if anchor:  # GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens
            headings = re.findall(r"^#+ (.+)$", (ROOT / target).read_text(), re.M)
            ids = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in ids, f"README links to {target}#{anchor}, which has no such heading"
