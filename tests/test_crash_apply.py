"""SIGKILL during ``edgekv memory apply`` leaves the memory OLD or NEW, byte for byte.

A quick, seeded subset of ``scripts/crash_harness.py``'s apply part (the full run: 240 kills,
``python scripts/crash_harness.py --adapt-kills 0 --commit-kills 0 --anchor-kills 0
--anchor-control-kills 0``): an apply of an update to a ~4 MB memory whose HNSW index is cached
beside it is killed at syscall boundaries (the child SIGKILLs itself right before its N-th open /
pread / fsync / rename / ...) or after a random delay. After each kill the memory must be OLD or
NEW (sha256), a cached index bound to the memory's state must pass its checks, HNSW search must
equal exact search, and a retry must reach NEW.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigkill_during_apply_leaves_old_or_new(tmp_path):
    out = tmp_path / "crash.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "crash_harness.py"), "--adapt-kills", "0",
           "--commit-kills", "0", "--anchor-kills", "0", "--anchor-control-kills", "0", "--apply-kills", "10",
           "--seed", "2", "--out", str(out), "--work", str(tmp_path / "w")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.exists(), res.stderr[-3000:]
    apply = json.loads(out.read_text())["apply"]
    assert apply["failures"] == [], "\n".join(apply["failures"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert apply["kills"] == 10 and sum(apply["outcomes"].values()) == 10 and apply["inconsistent_states"] == 0
    assert apply["kill_modes"] == {"syscall-boundary": 5, "random": 5}
    assert sum(apply["index_after_kill"].values()) == 10
    assert apply["retries"] == apply["retries_reached_new"]
    assert apply["boundaries_per_apply"]["inplace"] > 20  # the fault injection sees the apply's calls
