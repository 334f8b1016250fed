"""The model the speed benchmarks time: the project's trained cifar_resnet20_v1, or the same
gluoncv network with random weights exported to a temporary folder when it is not there
(times do not depend on the weights)."""
from __future__ import annotations

import tempfile
from pathlib import Path

TRAINED = Path(__file__).resolve().parents[1] / "models" / "cifar_resnet20_v1"


def resnet20_prefix(prefix=TRAINED) -> str:
    """`prefix` when PREFIX-symbol.json exists, else the random-weight export's prefix."""
    if Path(f"{prefix}-symbol.json").exists():
        return str(prefix)
    import mxnet as mx
    from gluoncv.model_zoo import get_model

    net = get_model("cifar_resnet20_v1", classes=10)
    net.initialize(mx.init.MSRAPrelu(factor_type="in", slope=0))
    net.hybridize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    prefix = Path(tempfile.mkdtemp(prefix="qgraph-bench-")) / "cifar_resnet20_v1"
    net.export(str(prefix))
    print("trained model not found: using random weights")
    return str(prefix)
