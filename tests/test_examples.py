"""Examples are smoke-run in a subprocess with tiny budgets."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_custom_loop_runs_and_exports():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--epochs", "30"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and "export check" in r.stdout
    assert "germinated conv1d_k5" in r.stdout  # the plateau rule fired within 30 epochs
    assert "sculpted: 1003 -> " in r.stdout  # Emrakul shrank the grown network, and its export agrees


@pytest.mark.slow
def test_readme_example_runs():
    """The README's functional-API example, extracted and executed as written."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n", text.index("## The functional API")) + len("```python\n")
    code = text[start:text.index("```", start)]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "grown network" in r.stdout
