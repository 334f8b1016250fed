#!/usr/bin/env python
"""QAT step time: cifar_resnet20_v1 training steps (batch 128, SGD with momentum) in FP32 and in
4-bit QAT (per-channel weights folded with fake BN, inputs signed where needed, offline
thresholds as train.py --qat uses them), and the same with thresholds learned by LSQ
(--learn-thresholds), interleaved in one run, median of `--repeats` rounds.

The model is models/cifar_resnet20_v1 when it is there, else the gluoncv network with random
weights (step time does not depend on the weights). A step is forward, backward and the
optimizer update, on one context. `--online` also times QAT with batch (online) thresholds.
Last line: `qat/fp32 step time ratio: X`.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
warnings.filterwarnings("ignore")

from resnet20 import resnet20_prefix  # noqa: E402


def make_step(net, data, label):
    from qgraph import training

    trainer = training.Optimization("sgd", 1e-4, wd=0.0, total_steps=10**6).trainer(net.collect_params())
    return lambda: training.train_step(net, trainer, data, label)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds (default: 10)")
    parser.add_argument("--online", action="store_true", help="also time QAT with online thresholds")
    parser.add_argument("--no-learned", action="store_true", help="skip the row with learned (LSQ) thresholds")
    args = parser.parse_args(argv)
    import mxnet as mx
    import numpy as np

    import passes
    import qgraph

    prefix = resnet20_prefix()
    rng = np.random.RandomState(0)
    data = mx.nd.array(rng.normal(0, 1, (args.batch_size, 3, 32, 32)).astype(np.float32))
    label = mx.nd.array(rng.randint(0, 10, args.batch_size))
    config = qgraph.QuantConfig(weight_bits=4, input_bits=4, quant_type="channel", input_signed="auto",
                                fake_bn=True, online=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")
    qat = passes.quantize(qgraph.load(f"{prefix}-symbol.json"), config)
    qat.calibrate(data.asnumpy(), "naive", calib_epoch=1, progress=False)
    steps = {"fp32": make_step(fp32, data, label), "qat": make_step(qat, data, label)}
    if not args.no_learned:
        learned = passes.quantize(qgraph.load(f"{prefix}-symbol.json"), config.replace(learn_thresholds=True))
        learned.calibrate(data.asnumpy(), "naive", calib_epoch=1, progress=False)
        steps["qat learned"] = make_step(learned, data, label)
    if args.online:
        online = passes.quantize(qgraph.load(f"{prefix}-symbol.json"), config.replace(online=True))
        steps["qat online"] = make_step(online, data, label)
    for step in steps.values():  # build the cached graphs and warm the allocator
        step()
        step()
    times: dict = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    for name, value in median.items():
        print(f"{name:12s} {value * 1000:8.1f} ms/step (median of {args.repeats})")
    if args.online:
        print(f"qat online/fp32 step time ratio: {median['qat online'] / median['fp32']:.2f}")
    if not args.no_learned:
        print(f"qat learned thresholds (LSQ)/fp32 step time ratio: {median['qat learned'] / median['fp32']:.2f}")
    print(f"qat/fp32 step time ratio: {median['qat'] / median['fp32']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
