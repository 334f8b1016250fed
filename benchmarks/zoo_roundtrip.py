#!/usr/bin/env python
"""zoo_roundtrip: every gluoncv image-classification model through qgraph, then through fold_bn.

For each model: build it with seeded random weights (He/MSRA fan-in init; the default
init makes deep nets output ~1e-15), run it once hybridized on a fixed random batch of
two (outside autograd.record, so BatchNorm uses its running statistics), give every
normalisation layer random gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1) and random running
statistics on the scale of the layer's actual input (mean ~ N(0, 0.1) * s, var ~
U(0.5, 2) * s**2 with s**2 = mean(input**2); see scale_batchnorm_stats for why unscaled
random statistics make deep nets too ill-conditioned to compare), and take that output as
the reference. Then

1. round trip: ``qgraph.load(net, input_shape=...)`` -> ``qgraph.to_block(graph)``;
   the output must equal the reference bit for bit (``np.array_equal``);
2. fold_bn: ``PassManager(passes.build_pipeline('fold_bn')).run(graph)`` ->
   ``to_block()``; ``max|a - b| / max|ref| <= --tol`` (1e-4). A failure also reports how
   far the model itself moves when its input is scaled by 1+1e-7 (its float32 conditioning).

Which models are "image classification": a name from
``gluoncv.model_zoo.get_model_list()`` whose constructor (``model_zoo._models[name]``)
is defined in one of CLASSIFICATION_MODULES below -- the ImageNet and CIFAR-10 backbones
(resnet v1/v2/v1b..v1s and their pruned variants, resnext/se_resnext, senet, resnest,
mobilenet v1/v2/v3, shufflenet, squeezenet, densenet, googlenet, inception v3, vgg,
alexnet, darknet53, dla34, nasnet, xception, hrnet, residual attention, cifar_*) --
except the hrnet ``*_s`` names (``purpose='seg'``: Cityscapes segmentation), plus the
``*_int8`` models of ``quantized.quantized`` whose float model is itself classification
(mobilenet1.0_int8, resnet50_v1_int8: pre-fused oneDNN int8 graphs shipped with gluoncv).
Detection, segmentation, pose, action recognition, depth and tracking models live in
other modules and are excluded. ``--list`` prints the selection.

Input size: ``cifar_*`` models get 32x32; the others the first of 64, 96, 128, 224, 299,
331 at which the model builds and runs hybridized (squeezenet, densenet, residual
attention and inception v3 need their native size). A model is skipped -- left out of N
and listed with the reason -- only when it cannot be built offline (its constructor
downloads a file) or runs only imperatively (HybridBlock.export has no Symbol to write,
e.g. gluoncv's GroupNorm in resnet*_v1b_gn); any other error is a failure.

Results go to stdout: a line per model, the skipped models, the failures, the total time
and, last, ``zoo roundtrip: K/N bit-exact, F/N fold_bn within 1e-4``. Progress (tqdm)
and logging go to stderr. Exit status 0 when K = F = N, 1 otherwise.

    python benchmarks/zoo_roundtrip.py                   # every classification model
    python benchmarks/zoo_roundtrip.py --quick           # a dozen small representative ones
    python benchmarks/zoo_roundtrip.py --models resnet18_v1,mobilenet0.25 -v
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("zoo_roundtrip")

CLASSIFICATION_MODULES = frozenset("gluoncv.model_zoo." + m for m in (
    "alexnet", "cifarresnet", "cifarresnext", "cifarwideresnet", "densenet", "dla", "googlenet",
    "hrnet", "inception", "mobilenet", "mobilenetv3", "nasnet", "pruned_resnet.resnetv1b_pruned",
    "residual_attentionnet", "resnest", "resnet", "resnetv1b", "resnext", "senet", "shufflenet",
    "squeezenet", "vgg", "xception", "yolo.darknet"))
QUANTIZED_MODULE = "gluoncv.model_zoo.quantized.quantized"

# Small, quick to build, and between them: plain/bottleneck/pre-activation residuals,
# v1b/v1d stems, a pruned net, grouped and depthwise convolutions, channel shuffle,
# squeeze-excitation, hard-swish, concatenations, FC heads with BatchNorm, a model without
# BatchNorm, a pre-fused int8 graph (operators with nested subgraphs), a CIFAR net at 32x32.
QUICK_MODELS = (
    "cifar_resnet20_v1", "resnet18_v1", "resnet18_v2", "resnet18_v1b_0.89", "resnet50_v1d",
    "se_resnet18_v1", "resnext50_32x4d", "mobilenet0.25", "mobilenetv2_0.25", "mobilenetv3_small",
    "shufflenet_v1", "squeezenet1.1", "densenet121", "vgg11_bn", "mobilenet1.0_int8",
)

CIFAR_SIZES = (32,)
IMAGENET_SIZES = (64, 96, 128, 224, 299, 331)
BATCH = 2
SEED = 0

# Random normalisation-layer state, drawn per parameter name suffix.
NORM_DRAWS = {
    "running_mean": lambda rng, shape: rng.normal(0.0, 0.1, shape),
    "running_var": lambda rng, shape: rng.uniform(0.5, 2.0, shape),
    "gamma": lambda rng, shape: rng.uniform(0.5, 1.5, shape),
    "beta": lambda rng, shape: rng.normal(0.0, 0.1, shape),
}


OFFLINE = "cannot be built offline"
NOT_HYBRIDIZABLE = "not hybridizable (no Symbol graph to export)"


class Skip(Exception):
    """The model cannot be part of the benchmark: `category` (OFFLINE, NOT_HYBRIDIZABLE), why."""

    def __init__(self, category: str, reason: str):
        super().__init__(reason)
        self.category = category


@dataclass
class Result:
    name: str
    size: int | None = None
    exact: bool = False
    fold_ok: bool = False
    rel_diff: float | None = None
    folded: int = 0
    fold_skipped: int = 0
    bn_left: int = 0
    nodes: int = 0
    seconds: float = 0.0
    problems: list = field(default_factory=list)


# ---------------------------------------------------------------------------- model list
def classification_models() -> list[str]:
    """The image-classification names of get_model_list(), in its order (see module doc)."""
    from gluoncv.model_zoo import get_model_list
    from gluoncv.model_zoo import model_zoo as zoo

    return [name for name in get_model_list() if _is_classification(name, zoo._models)]


def _is_classification(name: str, constructors: dict) -> bool:
    module = getattr(constructors.get(name), "__module__", "")
    if module == QUANTIZED_MODULE:
        return name.endswith("_int8") and _is_classification(name[: -len("_int8")], constructors)
    if module == "gluoncv.model_zoo.hrnet":
        return not name.endswith("_s")
    return module in CLASSIFICATION_MODULES


def input_sizes(name: str) -> tuple:
    return CIFAR_SIZES if name.startswith("cifar_") else IMAGENET_SIZES


# ---------------------------------------------------------------------------- building
def _initializer():
    import mxnet as mx

    class HeInit(mx.init.MSRAPrelu):
        """MSRA fan-in init with ReLU gain for weights; zeros for vectors and unknown names
        (SymbolBlock parameters carry no initializer of their own)."""

        def __init__(self):
            super().__init__(factor_type="in", slope=0.0)

        def _init_weight(self, name, arr):
            if arr.ndim < 2:
                arr[:] = 0.0
            else:
                super()._init_weight(name, arr)

        _init_default = _init_weight

    return HeInit()


def _seed(seed: int) -> None:
    import mxnet as mx

    mx.random.seed(seed)
    np.random.seed(seed)


def _is_download_error(err: BaseException) -> bool:
    """True when `err` (or its cause) comes from fetching a file over the network."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        module = type(err).__module__
        if module.startswith(("requests", "urllib", "socket", "http")) or "download" in str(err).lower():
            return True
        err = err.__cause__ or err.__context__
    return False


def error_text(err: BaseException) -> str:
    import mxnet as mx

    from qgraph.errors import mxnet_error_line

    if isinstance(err, mx.base.MXNetError):
        return mxnet_error_line(err)
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def _construct(name: str, seed: int):
    from gluoncv.model_zoo import get_model

    _seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_model(name, pretrained=False)
    except Exception as err:  # noqa: BLE001 - a zoo constructor can raise anything
        if _is_download_error(err):
            raise Skip(OFFLINE, f"the constructor downloads a file ({error_text(err)})") from err
        raise RuntimeError(f"cannot construct: {error_text(err)}") from err


def _first_run(name: str, size: int, seed: int, hybridize: bool):
    """(net, x): a fresh randomly initialised model after one forward at `size`."""
    import mxnet as mx

    net = _construct(name, seed)
    x = mx.nd.array(np.random.RandomState(seed).normal(0.0, 1.0, (BATCH, 3, size, size)).astype(np.float32))
    chatter = io.StringIO()  # MXNet prints "infer_shape error. Arguments: ..." to stdout
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        net.initialize(_initializer())
        net.hybridize(active=hybridize)
        net(x)
        mx.nd.waitall()
    return net, x


def build(name: str, seed: int = SEED):
    """(net, input batch, size): the model at the first size it runs at hybridized, randomly
    initialised and run once. Raises Skip when it cannot be built offline or runs only
    imperatively (no Symbol to export), RuntimeError naming what failed otherwise."""
    tried = []
    for size in input_sizes(name):
        try:
            net, x = _first_run(name, size, seed, hybridize=True)
        except Skip:
            raise
        except Exception as err:  # noqa: BLE001 - shape errors at a too-small size
            tried.append(f"{size}px: {error_text(err)}")
            log.debug("%s does not run hybridized at %dpx: %s", name, size, tried[-1])
            gc.collect()
            continue
        return net, x, size
    for size in input_sizes(name):
        try:
            _first_run(name, size, seed, hybridize=False)
        except Exception:  # noqa: BLE001 - fails imperatively too: a real failure, reported below
            gc.collect()
            continue
        raise Skip(NOT_HYBRIDIZABLE, f"runs imperatively at {size}px but not hybridized, so "
                                     f"HybridBlock.export has no Symbol to write ({tried[0]})")
    raise RuntimeError("runs at none of the sizes: " + "; ".join(tried))


def randomize_norm_params(net, seed: int = SEED) -> int:
    """Random running mean/var, gamma and beta (NORM_DRAWS) for every normalisation layer;
    returns how many parameters were set. scale_batchnorm_stats then rescales the running
    statistics of Gluon BatchNorm layers to their inputs."""
    import mxnet as mx

    rng = np.random.RandomState(seed + 1)
    count = 0
    for pname, param in sorted(net.collect_params().items()):
        for suffix, draw in NORM_DRAWS.items():
            if pname.endswith("_" + suffix):
                value = draw(rng, param.shape).astype(np.float32)
                param.set_data(mx.nd.array(value, dtype=param.dtype))
                count += 1
                break
    return count


def scale_batchnorm_stats(net, x, seed: int = SEED) -> int:
    """Random running statistics on the scale of each Gluon BatchNorm's actual input: with
    s2 = mean(input**2) on `x`, running_mean ~ N(0, 0.1) * sqrt(s2) and running_var ~
    U(0.5, 2) * s2. Set layer by layer in one imperative inference forward (a forward pre-hook
    on each BatchNorm, so every layer sees the statistics upstream layers already got);
    returns how many layers.

    Why: with unscaled random statistics activations drift by orders of magnitude through a
    deep net and squeeze-excitation / split-attention gates then turn float32 rounding into
    large output changes (se_resnet101_v1: a 1e-7 relative input change moved the output by
    10%), so no float rewrite could stay within 1e-4. Exact per-channel statistics are no
    better: centring each channel on two samples amplifies rounding as much (resnest101: 3e-3).
    Scaled random statistics keep activations O(1) and the nets as well conditioned as the
    float32 rounding of a single layer (about 1e-6).
    """
    import mxnet as mx

    rng = np.random.RandomState(seed + 2)
    layers = []
    net.apply(lambda block: layers.append(block) if isinstance(block, mx.gluon.nn.BatchNorm) else None)

    def set_stats(layer, args):
        data = args[0].asnumpy().astype(np.float64)
        s2 = float(np.mean(data * data)) or 1.0
        shape = layer.running_mean.shape
        layer.running_mean.set_data(mx.nd.array(rng.normal(0.0, 0.1, shape) * np.sqrt(s2)))
        layer.running_var.set_data(mx.nd.array(rng.uniform(0.5, 2.0, shape) * s2))

    handles = [layer.register_forward_pre_hook(set_stats) for layer in layers]
    try:
        if layers:
            net.hybridize(active=False)
            net(x)
            mx.nd.waitall()
    finally:
        for handle in handles:
            handle.detach()
        net.hybridize()
    return len(layers)


def sensitivity(net, x, ref: list, eps: float = 1e-7) -> float:
    """How far the model's own output moves (max|a-b|/max|ref|) when the input is scaled by 1+eps:
    a fold_bn difference of that order is float32 conditioning, not a wrong fold."""
    return relative_diff(outputs(net, x * (1.0 + eps)), ref)


# ---------------------------------------------------------------------------- comparing
def outputs(block, x) -> list[np.ndarray]:
    out = block(x)
    return [o.asnumpy() for o in (out if isinstance(out, (list, tuple)) else [out])]


def bit_exact(got: list, ref: list) -> tuple[bool, str]:
    if len(got) != len(ref):
        return False, f"{len(got)} outputs instead of {len(ref)}"
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, f"output {i}: {a.dtype}{a.shape} instead of {b.dtype}{b.shape}"
        if not np.array_equal(a, b, equal_nan=True):
            diff = np.abs(a.astype(np.float64) - b)
            return False, (f"output {i}: {int(np.count_nonzero(a != b))}/{a.size} values differ, "
                           f"max|a-b| = {np.nanmax(diff):.3g}")
    return True, ""


def relative_diff(got: list, ref: list) -> float:
    """max over outputs of max|a - b| / max|ref| (inf when the shapes differ)."""
    worst = 0.0
    if len(got) != len(ref):
        return float("inf")
    for a, b in zip(got, ref):
        if a.shape != b.shape:
            return float("inf")
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        diff = float(np.max(np.abs(a.astype(np.float64) - b))) if b.size else 0.0
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


# ---------------------------------------------------------------------------- one model
def run_model(name: str, tol: float, seed: int = SEED) -> Result:
    """Build, round trip and fold one model. Raises Skip; other errors land in `problems`."""
    import mxnet as mx

    import passes
    import qgraph

    result = Result(name)
    start = time.perf_counter()
    try:
        net, x, result.size = build(name, seed)
        randomize_norm_params(net, seed)
        scale_batchnorm_stats(net, x, seed)
        ref = outputs(net, x)
        if not all(np.isfinite(r).all() for r in ref):
            raise RuntimeError("the reference output is not finite; nothing to compare")
        graph = qgraph.load(net, input_shape=tuple(x.shape))
        result.nodes = len(graph)

        result.exact, why = bit_exact(outputs(qgraph.to_block(graph), x), ref)
        if not result.exact:
            result.problems.append(f"round trip not bit-exact: {why}")

        folded, report = qgraph.PassManager(passes.build_pipeline("fold_bn")).run(graph)
        entries = report.for_pass("fold_bn")
        result.folded = sum(e.action == "changed" for e in entries)
        result.fold_skipped = len(entries) - result.folded
        result.bn_left = len(folded.nodes("BatchNorm"))
        result.rel_diff = relative_diff(outputs(qgraph.to_block(folded), x), ref)
        result.fold_ok = result.rel_diff <= tol
        if not result.fold_ok:
            result.problems.append(f"fold_bn: max|a-b|/max|ref| = {result.rel_diff:.3g} > {format_tol(tol)} "
                                   f"(the model itself moves by {sensitivity(net, x, ref):.3g} "
                                   "when its input is scaled by 1+1e-7)")
        del net, graph, folded
    except Skip:
        raise
    except Exception as err:  # noqa: BLE001 - one model's failure must not stop the benchmark
        log.debug("%s failed", name, exc_info=True)
        result.problems.append(error_text(err))
    finally:
        mx.nd.waitall()
        gc.collect()
        result.seconds = time.perf_counter() - start
    return result


def format_tol(tol: float) -> str:
    """1e-4 rather than 0.0001 or 1e-04."""
    mantissa, exponent = f"{tol:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def format_result(r: Result) -> str:
    status = "ok  " if r.exact and r.fold_ok else "FAIL"
    size = f"{r.size}px" if r.size else "-"
    rel = f"{r.rel_diff:.1e}" if r.rel_diff is not None else "-"
    return (f"{status} {r.name:32s} {size:>6s} {r.nodes:5d} nodes  exact={'yes' if r.exact else 'no ':3s}  "
            f"fold_bn rel={rel:>8s} ({r.folded} folded, {r.fold_skipped} skipped, "
            f"{r.bn_left} BN left)  {r.seconds:6.1f}s")


# ---------------------------------------------------------------------------- command line
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--quick", action="store_true", help=f"only {len(QUICK_MODELS)} small representative models")
    pick.add_argument("--models", help="comma-separated model names (any gluoncv model name)")
    parser.add_argument("--limit", type=int, help="only the first N selected models")
    parser.add_argument("--list", action="store_true", help="print the selected models and exit")
    parser.add_argument("--tol", type=float, default=1e-4, help="fold_bn tolerance on max|a-b|/max|ref|")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of failures)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    return args


def select_models(args) -> list[str]:
    if args.models:
        from gluoncv.model_zoo import get_model_list

        names = [n.strip() for n in args.models.split(",") if n.strip()]
        known = set(get_model_list())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown model(s): {', '.join(unknown)} (see --list)")
    elif args.quick:
        names = list(QUICK_MODELS)
    else:
        names = classification_models()
    return names[: args.limit] if args.limit else names


def _quiet_warnings() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(gluoncv|mxnet)(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(gluoncv|mxnet)(\.|$)")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _quiet_warnings()
    with tempfile.TemporaryDirectory(prefix="zoo-roundtrip-mxnet-") as mxnet_home:
        os.environ.setdefault("MXNET_HOME", mxnet_home)  # a constructor must never touch ~/.mxnet
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        names = select_models(args)
        if args.list:
            print("\n".join(names))
            return 0
        log.info("%d models, MXNET_HOME=%s", len(names), os.environ["MXNET_HOME"])
        results, skipped = [], []
        start = time.perf_counter()
        with logging_redirect_tqdm():
            bar = tqdm(names, file=sys.stderr, unit="model", dynamic_ncols=True)
            for name in bar:
                bar.set_postfix_str(name)
                try:
                    result = run_model(name, args.tol, args.seed)
                except Skip as why:
                    skipped.append((name, why.category, str(why)))
                    log.info("%s skipped (%s): %s", name, why.category, why)
                    continue
                results.append(result)
                print(format_result(result), flush=True)
                if result.problems:
                    log.warning("%s: %s", name, "; ".join(result.problems))
        total = time.perf_counter() - start
    return report(results, skipped, total, args.tol)


def report(results: list, skipped: list, total: float, tol: float) -> int:
    n = len(results)
    print()
    k = sum(r.exact for r in results)
    f = sum(r.fold_ok for r in results)
    for category in (OFFLINE, NOT_HYBRIDIZABLE):
        names = [(name, why) for name, cat, why in skipped if cat == category]
        print(f"skipped, {category}: {len(names) or 'none'}")
        for name, why in names:
            print(f"  {name}: {why}")
    failures = [r for r in results if r.problems]
    print(f"failures: {len(failures) or 'none'}")
    for r in failures:
        print(f"  {r.name}: {'; '.join(r.problems)}")
    slowest = sorted(results, key=lambda r: -r.seconds)[:3]
    print(f"total time {total:.0f} s for {n + len(skipped)} models (slowest: "
          + ", ".join(f"{r.name} {r.seconds:.0f} s" for r in slowest) + ")")
    print(f"zoo roundtrip: {k}/{n} bit-exact, {f}/{n} fold_bn within {format_tol(tol)}", flush=True)
    return 0 if k == f == n else 1


if __name__ == "__main__":
    sys.exit(main())
