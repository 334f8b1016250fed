"""Fixtures shared by the tool tests."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from qgraph.data import mnist_split

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "mnist_cnn"


@pytest.fixture
def model(tmp_path):
    """A private copy of the bundled model, so a test may damage it; the prefix tmp_path/m."""
    for suffix in ("-symbol.json", "-0000.params"):
        shutil.copy(f"{BUNDLED}{suffix}", tmp_path / f"m{suffix}")
    return tmp_path / "m"


@pytest.fixture
def mnist_files(tmp_path):
    """200 bundled MNIST training images as calib.npy and 200 test images with labels as test.npz."""
    (x_train, _), (x_test, y_test) = mnist_split()
    np.save(tmp_path / "calib.npy", x_train[:200])
    np.savez(tmp_path / "test.npz", data=x_test[:200], label=y_test[:200])
    return tmp_path / "calib.npy", tmp_path / "test.npz"


@pytest.fixture
def run_main(capsys):
    """Call a tool's main(argv) in-process: (exit code, stdout, stderr)."""
    def run(main, argv):
        rc = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err
    return run
