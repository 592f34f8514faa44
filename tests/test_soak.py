"""The soak benchmark's short version (benchmarks/soak.py, run for 20 minutes in
BENCHMARKS.md): a minute of mixed load on a server traced at level 3 leaves no memory
growth, descriptor, thread, KV page, open request or queued span behind."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # benchmarks/soak.py: a server on the bundled model for a minute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_minute_of_mixed_load_leaves_nothing_behind(tmp_path):
    command = [sys.executable, os.path.join(REPO, "benchmarks", "soak.py"), "--seconds", "60", "--kv-tokens", "4096",
               "--sample-every", "20", "--log", str(tmp_path / "server.log")]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=480)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verdict: PASS" in run.stdout
    for figure in ("RSS after warm-up", "KV cache: 256 pages of 16 tokens; held by requests 0;",
                   "open requests: HTTP side 0, running 0, waiting 0", "tracing: level 3;"):
        assert figure in run.stdout, run.stdout
