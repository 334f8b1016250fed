"""fake_bn (QAT only): Convolution -> BatchNorm keeps its BatchNorm, but the convolution's
weight becomes the folded weight, quantized, then unfolded:

    s = gamma / sqrt(running_var + eps)          (gamma = 1 when fix_gamma)
    conv(x, W)  =>  conv(x, Q(W * s) / s)        (Q is added by insert_fake_quant)

so the quantization grid is that of the weight a deployment folds, W * s, after Jacob et
al. (arXiv:1712.05877). In training the BatchNorm normalises with batch statistics and
updates its running statistics by EMA (MXNet's own BatchNorm op, so gradients flow
through the batch statistics); in inference, and in training once BN is frozen, it uses
the running statistics, and the layer computes exactly the deployed Q(W * s) * x + bias.
This is the folded form of PyTorch's ConvBn QAT modules; it needs no second convolution
for the batch statistics, which keeps a QAT step cheap. With quantization disabled the
weight is W * s / s, i.e. the original layer within float rounding. fold_bn recognises
the form (qgraph.folding.fake_bn_fold) and folds it back to Q(W * s).
"""
from __future__ import annotations

from qgraph import attrs as A
from qgraph.attrs import format_tuple
from qgraph.folding import bn_fold_blocker
from qgraph.graph import Graph
from qgraph.pass_manager import PassContext
from qgraph.tags import EXCLUDE_TAG, FAKE_BN_TAG


class FakeBN:
    name = "fake_bn"
    requires = ()

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        for conv, bn in graph.match_chain(["Convolution", "BatchNorm"]):
            reason = _skip_reason(graph, conv, bn)
            if reason:
                ctx.report.skipped(self.name, conv, reason)
                continue
            _rewrite(graph, conv, bn)
            ctx.report.changed(self.name, conv, f"weight folded with {bn}'s running statistics for quantization")
        return graph


def _skip_reason(graph: Graph, conv: str, bn: str) -> str | None:
    if graph.attrs(conv).get(EXCLUDE_TAG):
        return f"excluded ({graph.attrs(conv)[EXCLUDE_TAG]}): stays float, nothing to fold for"
    if graph.attrs(graph.inputs(conv)[1].node).get(FAKE_BN_TAG):
        return "weight already folded by fake_bn"
    if A.get_int(graph.attrs(bn), "axis", 1, bn) != 1 or graph.attrs(conv).get("layout", "None") not in (
            "None", "NCW", "NCHW", "NCDHW"):
        return "not channel-first: the per-channel fold needs axis 1"
    # the rule fold_bn uses: a deployment must be able to fold this pair
    return bn_fold_blocker(graph, conv, bn)


def _rewrite(graph: Graph, conv: str, bn: str) -> None:
    attrs = graph.attrs(bn)
    gamma, _, _, running_var = graph.inputs(bn)[1:5]
    weight = graph.inputs(conv)[1]
    ndim = len(graph.param_shape(weight.node))
    # MXNet cannot infer a parameter's shape backwards through broadcast ops
    graph.set_attr(weight.node, "__shape__", format_tuple(graph.param_shape(weight.node)))
    node = graph.builder(f"{conv}_fakebn", {FAKE_BN_TAG: bn})
    inv_std = node("rsqrt", "inv_std", [node("_plus_scalar", "var_eps", [running_var],
                                             scalar=A.get_float(attrs, "eps", 1e-3, bn))])
    fix_gamma = A.get_bool(attrs, "fix_gamma", True, bn)
    scale = inv_std if fix_gamma else node("elemwise_mul", "scale", [gamma, inv_std])
    scale = node("Reshape", "scale_per_channel", [scale], shape=(-1,) + (1,) * (ndim - 1))
    folded = node("broadcast_mul", "fold", [weight, scale])
    # gamma = 0 gives s = 0: divide by 1 instead, the weight is 0 either way and BN outputs beta
    safe = node("elemwise_add", "safe_scale", [scale, node("_equal_scalar", "zero_scale", [scale], scalar=0.0)])
    unfolded = node("broadcast_div", "unfold", [folded, safe])
    graph.set_input(conv, 1, unfolded)
