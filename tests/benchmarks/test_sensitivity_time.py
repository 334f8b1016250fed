"""benchmarks/sensitivity_time.py runs end to end on a few images and ends with its figure."""
import re

from benchmarks.sensitivity_time import main


def test_prints_seconds_per_layer_last(capsys):
    assert main(["--images", "24", "--batch-size", "24"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("22 layers, 24 images") for line in lines)
    assert re.fullmatch(r"sensitivity seconds per layer: \d+\.\d\d", lines[-1])
