"""benchmarks/zoo_roundtrip.py --quick: a dozen gluoncv classification models round-trip
bit-exactly through qgraph and stay within 1e-4 after fold_bn."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "zoo_roundtrip.py"
LAST_LINE = re.compile(r"zoo roundtrip: (\d+)/(\d+) bit-exact, (\d+)/(\d+) fold_bn within 1e-4")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gluoncv") is None, reason="gluoncv is not installed")


def test_quick_zoo_roundtrip_is_exact_and_folds(tmp_path):
    env = dict(os.environ, MXNET_HOME=str(tmp_path / "mxnet_home"), PYTHONWARNINGS="ignore::DeprecationWarning")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, f"unexpected last line {lines[-1]!r}; stderr:\n{proc.stderr[-3000:]}"
    k, n, f, n2 = map(int, match.groups())
    assert n == n2 >= 10, proc.stdout
    assert k == f == n, proc.stdout
    assert proc.returncode == 0, proc.stdout


def test_list_selects_classification_models_only(tmp_path):
    env = dict(os.environ, MXNET_HOME=str(tmp_path / "mxnet_home"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--list"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = proc.stdout.split()
    assert len(names) >= 60
    for expected in ("resnet18_v1", "cifar_resnet20_v1", "mobilenetv3_small", "hrnet_w18_c", "darknet53"):
        assert expected in names
    for excluded in ("ssd_512_resnet50_v1_voc", "yolo3_darknet53_coco", "fcn_resnet50_voc",
                     "simple_pose_resnet18_v1b", "hrnet_w48_s", "i3d_resnet50_v1_kinetics400"):
        assert excluded not in names
