"""tools/demo.py, the README's main job: one table row per strategy, and QAT beating calibration alone."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_prints_every_strategy_and_qat_wins_back_accuracy():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--qat-steps", "40"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in result.stdout.splitlines()
            if line.startswith("| int")}
    assert len(rows) == 9
    qat = rows["int4 per-channel, percentile calibration + 40 QAT steps (fake BN)"]
    assert qat > rows["int4 per-channel, percentile calibration"] + 3
