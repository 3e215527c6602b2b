"""Without an optional extra, the tests that need it skip with a reason; none fails at import.

Each run blocks one optional module (``FASTIF_TEST_WITHOUT``, read by conftest.py) and collects the whole suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ["transformers", "faiss", "matplotlib", "pandas", "sklearn", "scipy"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("module", EXTRAS)
def test_suite_collects_without(module):
    env = {**os.environ, "FASTIF_TEST_WITHOUT": module}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.splitlines()[-1].lower(), proc.stdout[-3000:]
