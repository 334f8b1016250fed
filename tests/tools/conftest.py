"""Fixtures shared by the tool tests."""
import shutil
from pathlib import Path

import pytest

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "mnist_cnn"


@pytest.fixture
def model(tmp_path):
    """A private copy of the bundled model, so a test may damage it; the prefix tmp_path/m."""
    for suffix in ("-symbol.json", "-0000.params"):
        shutil.copy(f"{BUNDLED}{suffix}", tmp_path / f"m{suffix}")
    return tmp_path / "m"
