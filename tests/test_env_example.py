"""examples/random_rollout.py is smoke-run in a subprocess with a tiny budget."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_random_rollout_example_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "random_rollout.py"), "--envs", "2", "--epochs", "3",
                        "--wait", "0", "--train-subset", "200"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "GERMINATE" in r.stdout  # with P(wait) = 0 the first action of each row germinates
    assert r.stdout.count("(run seed") == 2 and "params 826 ->" in r.stdout
