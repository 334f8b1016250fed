"""benchmarks/dist_equivalence.py, short: 4-bit QAT with fake BN on cifar_resnet20_v1 over two
dist_sync workers ends with the weights one process over two contexts reaches on the same
images, and the script's last line says so in its fixed format."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qgraph.data import default_cifar10_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(default_cifar10_dir() is None, reason="CIFAR-10 RecordIO not found at ../shared/data/cifar10")
def test_two_dist_sync_workers_match_two_contexts():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dist_equivalence.py"), "--steps", "3",
                             "--batch-size", "8"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"dist_sync worker 1 vs worker 0 max weight difference: 0", lines[-3])
    moved = float(re.search(r"largest change from the start (\S+)$", lines[-4]).group(1))
    last = re.fullmatch(r"dist_sync vs local max weight difference: (\S+)", lines[-1])
    assert last and float(last.group(1)) <= 1e-5 and moved > 1e-3
