"""SIGKILL during ``edgekv adapt`` leaves the memory before or after the step, byte for byte.

A quick, seeded subset of ``scripts/crash_harness.py`` (the full run: 120 adapt kills and
240 ``commit_update`` kills, ``python scripts/crash_harness.py``): 10 kills of the real CLI
over a two-task chain on the tiny Llama, each at a random moment or right inside the
commit's write. The harness checks after every kill that the memory opens, passes
``verify()`` and equals (sha256) the state before the step, the freshly created memory, or
the state after it, that the anchors the loader returns are that state's, and that a retry
after the crash reaches exactly the next state (memory and anchors file). (Kills of
``commit_update`` alone are tests/test_crash.py; of the anchors + memory commit,
tests/test_crash_anchors.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigkill_during_adapt_leaves_old_or_new_state(tmp_path):
    out = tmp_path / "crash.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "crash_harness.py"), "--adapt-kills", "10",
           "--commit-kills", "0", "--anchor-kills", "0", "--anchor-control-kills", "0", "--apply-kills", "0", "--tasks", "2",
           "--seed", "1",
           "--out", str(out), "--work", str(tmp_path / "w")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.exists(), res.stderr[-3000:]
    report = json.loads(out.read_text())
    adapt = report["adapt"]
    assert adapt["failures"] == [], "\n".join(adapt["failures"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert adapt["deterministic"] and adapt["created_spec_matches"]  # else "old or new" would mean nothing
    assert adapt["kills"] == 10 and sum(adapt["outcomes"].values()) == 10
    assert sum(adapt["per_step_kills"].values()) == 10 and adapt["per_step_kills"]["2"] > 0
    assert adapt["retries"] == adapt["retries_reached_next_state"]
    assert adapt["inconsistent_anchors"] == 0  # the anchors the loader returns belong to the memory's state
