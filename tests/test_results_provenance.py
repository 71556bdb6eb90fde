"""Every committed benchmark result (benchmarks/results/**/*.json) says where it came from: the git
commit and whether the tree was dirty, the command as typed in the checkout (no machine paths), the
versions and the machine, and which fusedmf backends ran. A result produced before these fields
existed is kept only with an explicit ``provenance_incomplete`` note saying what it lacks and why;
``bash scripts/bench.sh --results <name>`` regenerates all of them into benchmarks/results/<name>/."""

import glob
import json
import os
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = sorted(p for p in glob.glob(os.path.join(ROOT, "benchmarks", "results", "**", "*.json"), recursive=True)
                 if not p.endswith("_trace.json"))  # Chrome traces are attachments of the JSON beside them


def provenance_problems(d: dict) -> list:
    """What a result lacks (an empty list: complete)."""
    problems = []
    m = d.get("machine")
    if not isinstance(m, dict):
        return ["no machine record"]
    git = m.get("git") or {}
    commit = git.get("commit") or ""
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        problems.append(f"git commit {commit!r} is not a full hash")
    if not isinstance(git.get("dirty"), bool):
        problems.append("no git dirty flag")
    cmd = m.get("command")
    if not cmd:
        problems.append("no command")
    else:
        absolute = [a for a in shlex.split(cmd) if a.startswith("/") or "=/" in a]
        if absolute:
            problems.append(f"command carries machine paths {absolute}")
    for key in ("torch", "python", "platform", "cpu_model", "cpu_count", "device_name", "utc"):
        if m.get(key) in (None, ""):
            problems.append(f"machine.{key} missing")
    if not d.get("backends_used"):
        problems.append("no backends_used")
    return problems


def test_there_are_committed_results():
    assert RESULTS, "no JSON under benchmarks/results/"


@pytest.mark.parametrize("path", RESULTS, ids=[os.path.relpath(p, ROOT) for p in RESULTS])
def test_result_records_its_provenance(path):
    with open(path) as f:
        d = json.load(f)
    problems = provenance_problems(d)
    note = d.get("provenance_incomplete")
    if note is not None:
        # honest marking of an old result: it must say what it lacks, and really lack it
        assert isinstance(note, dict) and note.get("reason") and note.get("lacks"), f"{path}: bad note {note!r}"
        assert problems, f"{path} is marked provenance_incomplete but has every field: drop the mark"
        return
    assert not problems, f"{os.path.relpath(path, ROOT)}: " + "; ".join(problems)


def test_the_check_fails_on_an_incomplete_record():
    """The check itself can fail: a record without commit, dirty flag or backends, with a machine path."""
    bad = {"machine": {"git": {"commit": "00de791"}, "command": "/opt/venv/bin/python benchmarks/x.py",
                       "torch": "2.11.0", "python": "3.11", "platform": "linux", "cpu_model": "x", "cpu_count": 2,
                       "device_name": "x", "utc": "now"}}
    problems = provenance_problems(bad)
    assert len(problems) == 4, problems
