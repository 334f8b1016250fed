"""The hidden node attributes by which rewrites mark what they built, so that later passes, the
runtime and the exporters can find it again. MXNet keeps `__*__` attributes through save and
load, so an exported graph can be taken apart again."""

FQ_TAG = "__qgraph_fq__"              # every node of a fake-quant subgraph; value: the subgraph's id
SPEC_TAG = "__qgraph_spec__"          # the exit node of a fake-quant subgraph; value: its FakeQuantSpec as JSON
EXCLUDE_TAG = "__qgraph_exclude__"    # a layer kept in float; value: why
FAKE_BN_TAG = "__qgraph_fake_bn__"    # nodes of passes/fake_bn.py; value: the BatchNorm folded
WINOGRAD_TAG = "__qgraph_winograd__"  # float Winograd transform nodes of a full-mode kernel; value: the layer
WINOGRAD_PRODUCT_TAG = "__qgraph_winograd_product__"  # a Winograd kernel's V . U product (quantized); value: the layer
TAP_TAG = "__qgraph_tap__"            # calibration taps; value: "<tensor>|<kind>"
BN_STATS_TAG = "__qgraph_bn_stats__"  # a layer BatchNorm was folded into (for equalize); value: its output mean/std
