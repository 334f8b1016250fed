#!/usr/bin/env python
"""sim_overhead: how close simulated evaluation comes to FP32 speed and memory.

Rows: cifar_resnet20_v1 and mobilenet0.5_cifar10 (the shipped models, batch 128, 3x32x32) and
resnet18_v1 (random weights, batch 32, 3x224x224). FP32 is the exported model as a SymbolBlock
hybridized with static_alloc; the simulation is passes.quantize with int8 per-channel weights,
int8/uint8 inputs (input_signed='auto'), BatchNorm merged, first convolution in float, input
thresholds calibrated offline (naive, on one batch), evaluated outside autograd. Timing is
interleaved in one process (median of --repeats rounds after warm-up); the online-threshold
simulation is timed the same way. Peak memory: each variant builds and runs in its own
process and reports its resident-set growth; the ratio is simulated over FP32.

Each row prints FP32 ms, simulated ms, their throughput ratio, the online ratio and the peak
memory ratio; the last line is `sim/fp32 throughput ratio: X`, X the minimum over the offline rows.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from gluoncv.model_zoo import get_model  # noqa: E402

import passes  # noqa: E402
import qgraph  # noqa: E402

MODELS = {  # name: (shipped prefix or zoo name, batch, input shape)
    "cifar_resnet20_v1": (ROOT / "models" / "cifar_resnet20_v1", 128, (3, 32, 32)),
    "mobilenet0.5_cifar10": (ROOT / "models" / "mobilenet0.5_cifar10", 128, (3, 32, 32)),
    "resnet18_v1": ("resnet18_v1", 32, (3, 224, 224)),
}
VARIANTS = ("fp32", "offline", "online")


def model_prefix(name: str, folder: str) -> str:
    source, _, shape = MODELS[name]
    if isinstance(source, Path):
        return str(source)
    net = get_model(source, classes=1000)
    net.initialize(mx.init.MSRAPrelu(factor_type="in", slope=0))
    net.hybridize()
    net(mx.nd.zeros((1,) + shape))
    prefix = str(Path(folder) / source)
    net.export(prefix)
    return prefix


def build(variant: str, prefix: str, batch: mx.nd.NDArray, thresholds: dict | None = None):
    """The block that computes `variant` (warmed up); `thresholds` spare the offline one its
    calibration (whose own forms would stay in memory)."""
    if variant == "fp32":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            block = mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")
        block.hybridize(static_alloc=True, static_shape=True)
    else:
        config = qgraph.QuantConfig(quant_type="channel", input_signed="auto", merge_bn=True,
                                    online=variant == "online")
        block = passes.quantize(prefix, config)
        if variant == "offline" and thresholds:
            block.set_thresholds(thresholds)
            block.quantize_input(True, online=False)
        elif variant == "offline":
            block.calibrate(batch, "naive", calib_epoch=1, progress=False)
    for _ in range(2):
        block(batch).wait_to_read()
    return block


def _batch(name: str) -> mx.nd.NDArray:
    _, size, shape = MODELS[name]
    return mx.nd.array(np.random.RandomState(0).standard_normal((size,) + shape).astype(np.float32))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(variant: str, name: str, prefix: str, thresholds: str) -> None:
    """Run one variant alone and print its peak resident-set growth in MB over the process after
    its imports and input batch (the peak counter is reset first, so imports do not count)."""
    batch = _batch(name)
    batch.wait_to_read()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak RSS, to the current RSS
    before = _status_kb("VmRSS")
    block = build(variant, prefix, batch, json.loads(Path(thresholds).read_text()) if thresholds else None)
    for _ in range(3):
        block(batch).wait_to_read()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def peak_mb(variant: str, name: str, prefix: str, thresholds: str) -> float:
    result = subprocess.run([sys.executable, __file__, "--child", variant, name, prefix, thresholds],
                            capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def time_row(name: str, prefix: str, repeats: int) -> tuple[dict, dict]:
    """(median seconds per variant, the offline net's thresholds)."""
    batch = _batch(name)
    blocks = {variant: build(variant, prefix, batch) for variant in VARIANTS}
    times = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant, block in blocks.items():
            start = time.perf_counter()
            block(batch).wait_to_read()
            times[variant].append(time.perf_counter() - start)
    return {variant: float(np.median(t)) for variant, t in times.items()}, blocks["offline"].thresholds()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated rows (default: all three)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timed rounds (default: 20)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "MODEL", "PREFIX", "THRESHOLDS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    offline_ratios = []
    with tempfile.TemporaryDirectory(prefix="qgraph-sim-overhead-") as folder:
        for name in args.models.split(","):
            prefix = model_prefix(name, folder)
            median, thresholds = time_row(name, prefix, args.repeats)
            threshold_file = Path(folder) / f"{name}-thresholds.json"
            threshold_file.write_text(json.dumps(thresholds))
            ratio, online = median["fp32"] / median["offline"], median["fp32"] / median["online"]
            memory = ""
            if not args.no_memory:
                peaks = {variant: peak_mb(variant, name, prefix, str(threshold_file)) for variant in ("fp32", "offline")}
                memory = (f", peak memory {peaks['offline']:.0f} MB vs {peaks['fp32']:.0f} MB: "
                          f"{peaks['offline'] / peaks['fp32']:.2f}x")
            print(f"{name:22s} batch {MODELS[name][1]:3d}: fp32 {1e3 * median['fp32']:7.1f} ms, simulated "
                  f"{1e3 * median['offline']:7.1f} ms ({ratio:.2f}), online {1e3 * median['online']:7.1f} ms "
                  f"({online:.2f}){memory}", flush=True)
            offline_ratios.append(ratio)
    print(f"sim/fp32 throughput ratio: {min(offline_ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
