"""qgraph.native: the fused fake-quant operators give the contract's values and gradient (numpy
reference, ties included), a whole model gives bit-identical outputs and gradients with them and
with the operator chains they replace, and a machine that cannot build them falls back with
a warning."""
import json
import threading
import warnings

import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN

import passes
import qgraph
from qgraph import native

F32 = np.float32


@pytest.fixture(scope="module", autouse=True)
def _built():
    if not native.available():
        pytest.skip("qgraph's fused operators are unavailable here (no C++ compiler?)")


def _run(op, inputs, attrs, head_gradient=None):
    """Forward (and backward with `head_gradient`) of one operator."""
    names = [f"in{i}" for i in range(len(inputs))]
    args = {n: mx.nd.array(v) for n, v in zip(names, inputs)}
    grads = {n: mx.nd.zeros(v.shape) for n, v in args.items()} if head_gradient is not None else None
    executor = native.symbol(op, names, **attrs).bind(mx.cpu(), args=args, args_grad=grads,
                                                      grad_req="write" if grads else "null")
    output = executor.forward(is_train=head_gradient is not None)[0].asnumpy()
    if head_gradient is None:
        return output, None
    executor.backward(mx.nd.array(head_gradient))
    return output, [grads[n].asnumpy() for n in names]


def test_fingerprint_is_a_fixed_weighted_sum_of_each_input():
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(s).astype(F32) for s in ((7,), (300, 5), (2, 3, 70000))]
    got, _ = _run(native.FINGERPRINT_OP, arrays, dict(num_args=3))
    again, _ = _run(native.FINGERPRINT_OP, arrays, dict(num_args=3))
    assert got.shape == (3,) and np.array_equal(got, again)
    plain = np.array([a.astype(np.float64).sum() for a in arrays])
    assert not np.allclose(got, plain)  # weighted, not a plain sum
    for i, a in enumerate(arrays):  # a sign flip, a swap of two elements, one changed element: all seen
        for changed in (-a, np.roll(a.ravel(), 1).reshape(a.shape), a + (np.arange(a.size) == 3).reshape(a.shape)):
            other, _ = _run(native.FINGERPRINT_OP, arrays[:i] + [changed.astype(F32)] + arrays[i + 1:], dict(num_args=3))
            assert other[i] != got[i] and np.array_equal(np.delete(other, i), np.delete(got, i))


def _reference(x, lower, upper, scale, step, rounding):
    c = np.minimum(np.maximum(x, F32(lower)), F32(upper))
    v = (c / F32(scale)).astype(np.float64)
    n = np.floor(np.abs(v) + 0.5) * np.sign(v) if rounding == "half_away" else np.rint(v)
    return (n.astype(F32) * F32(step)).astype(F32)


def _values(T, levels, signed):
    """Every rounding tie of the step and its float32 neighbours, beyond the range, and random."""
    s = F32(T) / F32(levels)
    k = np.arange(-levels - 2 if signed else -2, levels + 2).astype(np.float64)
    ties = ((k + 0.5) * s).astype(F32)
    rng = np.random.default_rng(levels)
    return np.concatenate([ties, np.nextafter(ties, F32(np.inf)), np.nextafter(ties, F32(-np.inf)), k.astype(F32) * s,
                           rng.uniform(-2 * T, 2 * T, 5000).astype(F32), [0, -0.0, T, -T]]).astype(F32)


def _weight_reference(w, groups, levels, rounding):
    """DESIGN.md's weight quantizer in float32: s = max(max|W_g| / L, 1e-30), clip(round(W / s), -L, L) * s."""
    grouped = w.reshape(groups, -1)
    s = np.maximum(np.abs(grouped).max(axis=1, keepdims=True) / F32(levels), F32(1e-30)).astype(F32)
    v = (grouped / s).astype(np.float64)
    n = np.floor(np.abs(v) + 0.5) * np.sign(v) if rounding == "half_away" else np.rint(v)
    return (np.clip(n, -levels, levels).astype(F32) * s).astype(F32).reshape(w.shape)


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_weight_operator_gives_the_contract_per_group_ties_and_zero_groups_included(bits, rounding):
    levels = 2 ** (bits - 1) - 1
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((6, 3, 3, 3)).astype(F32)
    w[1] = 0  # an all-zero group quantizes to zeros, not NaN
    s = np.abs(w[2]).max() / F32(levels)  # group 2 holds every rounding tie of its step and its neighbours
    k = np.arange(-levels, levels) if levels < 14 else rng.integers(-levels, levels, 13)
    ties = ((k[:13] + 0.5) * s).astype(F32)
    flat = w[2].reshape(-1)
    flat[:len(ties)] = np.nextafter(ties, F32(np.inf)) if bits % 2 else ties
    flat[-1] = np.abs(w[2]).max()  # keep the group's maximum
    w[2] = flat.reshape(w[2].shape)
    for groups in (1, 2, 6):
        got, gradient = _run(native.WEIGHT_FAKE_QUANT_OP, [w], dict(groups=groups, levels=levels, min_scale=1e-30,
                                                                   rounding=rounding), np.ones_like(w))
        np.testing.assert_array_equal(got, _weight_reference(w, groups, levels, rounding), err_msg=f"groups={groups}")
        assert not gradient[0].any()  # the straight-through estimator around it gives the gradient
    assert not np.isnan(got).any() and not got[1].any()


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
@pytest.mark.parametrize("quant_type", ["layer", "channel", "group"])
def test_quantized_weights_are_bit_identical_with_the_weight_operator_and_the_chain(quant_type, rounding,
                                                                                    monkeypatch):
    """Bit for bit, the sign of zero included (3-bit weights round many small negatives to zero)."""
    config = qgraph.QuantConfig(weight_bits=3, quant_type=quant_type, fake_bn=True, exclude_first_conv=False,
                                rounding=rounding)
    results = {}
    for fused in (True, False):
        monkeypatch.setenv("QGRAPH_NATIVE", "1" if fused else "0")
        net = passes.quantize(f"{MNIST_CNN}-symbol.json", config)
        results[fused] = net.quantized_weights()
        ops = {net.emission().graph.op(n) for n in net.emission().graph.nodes()}
        assert (native.WEIGHT_FAKE_QUANT_OP in ops) == fused
    assert results[True].keys() == results[False].keys()
    for layer, value in results[True].items():
        np.testing.assert_array_equal(value.view(np.uint32), results[False][layer].view(np.uint32), err_msg=layer)
    # the case is exercised: MXNet's round gives -0 for small negatives, the half-even chain +0
    negative_zeros = any(np.signbit(v[v == 0]).any() for v in results[False].values())
    assert negative_zeros == (rounding == "half_away")


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_a_nan_or_infinite_weight_makes_its_group_nan_as_the_chain_does(rounding):
    """A diverged weight must show, not be quantized away: MXNet's max, _maximum_scalar and clip
    pass NaN on, so the chain gives its whole group NaN (an infinite weight too: inf / inf, 0 * inf)."""
    w = np.array([[0.5, np.nan, -0.25, 0.1], [1.0, -np.inf, 0.2, 0.0], [0.4, -0.1, 0.3, 0.05]], F32)
    got, _ = _run(native.WEIGHT_FAKE_QUANT_OP, [w], dict(groups=3, levels=3, min_scale=1e-30, rounding=rounding))
    assert np.isnan(got[:2]).all()
    np.testing.assert_array_equal(got[2], _weight_reference(w[2:], 1, 3, rounding)[0])


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
def test_fused_operator_gives_the_contract_and_the_straight_through_gradient(bits, signed, rounding):
    T = 2.9
    levels = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    step = F32(T) / F32(levels)
    lower = -T if signed else 0.0
    xs = _values(T, levels, signed)
    attrs = dict(lower=lower, upper=T, scale=float(step), step=float(step), rounding=rounding)
    head = np.arange(1, xs.size + 1, dtype=F32)
    y, (gradient,) = _run(native.FAKE_QUANT_OP, [xs], attrs, head)
    np.testing.assert_array_equal(y, _reference(xs, lower, T, step, step, rounding))
    inside = (xs >= F32(lower)) & (xs <= F32(T))
    np.testing.assert_array_equal(gradient, np.where(inside, head, 0).astype(F32))


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
@pytest.mark.parametrize("signed", [False, True])
def test_online_operator_takes_the_threshold_from_its_second_input(signed, rounding):
    levels = 127 if signed else 255
    x = _values(1.7, levels, signed)
    T = F32(np.abs(x).max())
    step = T / F32(levels)
    got, _ = _run(native.ONLINE_FAKE_QUANT_OP, [x, np.array([T], F32)],
                  dict(levels=levels, signed=int(signed), min_scale=1e-30, rounding=rounding))
    v = np.clip((x / step).astype(F32), -levels if signed else 0, levels).astype(np.float64)
    n = np.floor(np.abs(v) + 0.5) * np.sign(v) if rounding == "half_away" else np.rint(v)
    np.testing.assert_array_equal(got, (n.astype(F32) * step).astype(F32))


def _outputs_and_gradients(config, x, monkeypatch, fused):
    monkeypatch.setenv("QGRAPH_NATIVE", "1" if fused else "0")
    net = passes.quantize(f"{MNIST_CNN}-symbol.json", config)
    if not config.online:
        net.calibrate(x, "naive", calib_epoch=1, progress=False)
    evaluation = net(mx.nd.array(x)).asnumpy()
    data = mx.nd.array(x)
    data.attach_grad()
    with mx.autograd.record():
        training = net(data)
    training.backward()
    ops = {n.graph.op(name) for _, n in net._blocks.values() for name in n.graph.nodes()}
    return evaluation, training.asnumpy(), data.grad.asnumpy(), ops


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_a_model_is_bit_identical_with_fused_operators_and_operator_chains(online, rounding, monkeypatch):
    config = qgraph.QuantConfig(weight_bits=4, input_bits=4, quant_type="channel", input_signed="auto",
                                online=online, rounding=rounding, fake_bn=not online)
    x = np.random.RandomState(3).rand(16, 1, 28, 28).astype(F32)
    fused = _outputs_and_gradients(config, x, monkeypatch, True)
    chain = _outputs_and_gradients(config, x, monkeypatch, False)
    for got, expected in zip(fused[:3], chain[:3]):  # bit for bit: the sign of zero too
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    op = native.ONLINE_FAKE_QUANT_OP if online else native.FAKE_QUANT_OP
    assert op in fused[3] and op not in chain[3]


@pytest.mark.parametrize("compiler, reason", [("no-such-compiler", "No such file"), ("false", "false failed: exit status 1")])
def test_without_a_working_compiler_the_chains_are_used_with_a_warning(compiler, reason, monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("QGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / compiler) if compiler.startswith("no-") else compiler)
    with pytest.warns(RuntimeWarning, match=f"fused operators unavailable .*{reason}"):
        assert native.available() is False
    assert native.available() is False  # tried once
    assert not list(tmp_path.rglob("*.so"))


def test_qgraph_native_0_turns_them_off(monkeypatch):
    monkeypatch.setenv("QGRAPH_NATIVE", "0")
    assert native.available() is False


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_learned_thresholds_train_alike_with_the_fused_operator_and_the_chain(rounding, monkeypatch):
    """LSQ: the same outputs and data gradient bit for bit; the thresholds' gradients (sums over
    every element, in another order) to float32 rounding."""
    config = qgraph.QuantConfig(weight_bits=4, input_bits=4, quant_type="channel", input_signed="auto",
                                online=False, learn_thresholds=True, rounding=rounding)
    x = np.random.RandomState(4).rand(16, 1, 28, 28).astype(F32)
    results = {}
    for fused in (True, False):
        monkeypatch.setenv("QGRAPH_NATIVE", "1" if fused else "0")
        net = passes.quantize(f"{MNIST_CNN}-symbol.json", config)
        net.calibrate(x, "naive", calib_epoch=1, progress=False)
        data = mx.nd.array(x)
        data.attach_grad()
        with mx.autograd.record():
            out = net(data)
            loss = (out * mx.nd.arange(out.size).reshape(out.shape)).sum()
        loss.backward()
        thresholds = {s.threshold: net.collect_params()[s.threshold].grad().asnumpy() for s in net.input_specs}
        ops = {e.graph.op(n) for _, e in net._blocks.values() for n in e.graph.nodes()}
        results[fused] = (out.asnumpy(), data.grad.asnumpy(), thresholds, ops)
    (out, grad, thresholds, ops), (out_chain, grad_chain, thresholds_chain, ops_chain) = results[True], results[False]
    np.testing.assert_array_equal(out, out_chain)
    np.testing.assert_array_equal(grad, grad_chain)
    assert thresholds.keys() == thresholds_chain.keys() and any(np.any(g != 0) for g in thresholds.values())
    for name, value in thresholds.items():
        np.testing.assert_allclose(value, thresholds_chain[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert native.LEARNED_FAKE_QUANT_OP in ops and native.LEARNED_FAKE_QUANT_OP not in ops_chain


def test_saved_graphs_keep_to_stock_operators(tmp_path):
    """Graphs meant for files (export, current_graph, fixed_graph) never use the fused operators,
    learned thresholds included: MXNet alone must load them."""
    config = qgraph.QuantConfig(weight_bits=4, input_bits=4, quant_type="channel", input_signed="auto",
                                online=False, learn_thresholds=True)
    net = passes.quantize(f"{MNIST_CNN}-symbol.json", config)
    x = np.random.RandomState(5).rand(8, 1, 28, 28).astype(F32)
    net.calibrate(x, "naive", calib_epoch=1, progress=False)
    with mx.autograd.record():
        net(mx.nd.array(x)).sum().backward()  # the fused training form has run
    for graph in (net.current_graph(), net.current_graph(training=False), passes.fixed_graph(net)):
        assert not [n for n in graph.nodes() if graph.op(n).startswith("qgraph_")]
    net.export(tmp_path / "m")
    ops = {node["op"] for node in json.loads((tmp_path / "m-symbol.json").read_text())["nodes"]}
    assert "Convolution" in ops and not [op for op in ops if op.startswith("qgraph_")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mx.gluon.SymbolBlock.imports(str(tmp_path / "m-symbol.json"), ["data"], str(tmp_path / "m-0000.params"))


# ---------------------------------------------------------------------- host-array functions
def _odd_floats(rng, shape):
    """Normal values with signed zeros, subnormals, the largest finite values and exact ties mixed in."""
    values = rng.standard_normal(shape).astype(F32).ravel()
    specials = F32([0.0, -0.0, 1e-45, -3e-39, np.finfo(F32).max, -np.finfo(F32).max, 0.5, 1.5])
    values[rng.choice(values.size, min(values.size, 40), replace=False)] = rng.choice(specials, min(values.size, 40))
    return values.reshape(shape)


def test_scale_rows_is_numpys_float32_product_bit_for_bit():
    """The fold's product: the float64 scale rounded to float32, one multiply, the same bits as
    numpy's (subnormal and overflowing products included), for shapes whose rows are not a
    multiple of any vector width."""
    host = native.host()
    assert host is not None
    rng = np.random.default_rng(11)
    shapes = [(1,), (3, 1), (5, 7), (16, 3, 3, 3), (33, 5, 1, 1), (2, 1000), (0, 4)]
    sources = [_odd_floats(rng, s) for s in shapes]
    scales64 = [np.concatenate([rng.uniform(-3, 3, max(s[0] - 2, 0)), [1e-40, 3.0]])[:s[0]] for s in shapes]
    outputs = [np.full(s, np.nan, F32) for s in shapes]
    host.scale_rows(sources, outputs, [c.astype(F32) for c in scales64])()
    for source, scale, out in zip(sources, scales64, outputs):
        with np.errstate(over="ignore"):
            expected = np.multiply(source, scale.astype(F32).reshape(-1, *[1] * (source.ndim - 1)))
        assert np.array_equal(out.view(np.uint32), expected.view(np.uint32)), source.shape


def _first_nonfinite(arrays, threads=1):
    """NonfiniteScan's answer with `threads` threads scanning at once."""
    scan = native.host().nonfinite_scan(arrays)
    helpers = [threading.Thread(target=scan) for _ in range(threads - 1)]
    for helper in helpers:
        helper.start()
    scan()
    for helper in helpers:
        helper.join()
    return scan.first()


@pytest.mark.parametrize("threads", [1, 3])
def test_nonfinite_scan_finds_the_first_array_holding_nan_or_inf_wherever_it_is(threads):
    """Positions at the ends of arrays and of the scan's 1 MB chunks (the last array spans three),
    with one thread or several sharing the chunks."""
    rng = np.random.default_rng(12)
    arrays = [_odd_floats(rng, (n,)) for n in (1, 7, 64, 1001, 2 * native.NonfiniteScan.CHUNK + 5)] + [np.zeros(0, F32)]
    assert _first_nonfinite(arrays, threads) == -1  # the largest finite values pass
    chunk = native.NonfiniteScan.CHUNK
    for bad in (np.nan, np.inf, -np.inf, np.uint32(0x7F800001).view(F32)):  # the last: a signalling NaN
        for index, position in ((0, 0), (1, 6), (2, 31), (3, 1000), (4, 0), (4, chunk - 1), (4, chunk), (4, 2 * chunk + 4)):
            changed = [a.copy() for a in arrays]
            changed[index][position] = bad
            assert _first_nonfinite(changed, threads) == index, (bad, index, position)
            later = [a.copy() for a in changed]
            later[4][-1] = np.inf
            assert _first_nonfinite(later, threads) == min(index, 4)


def test_nonfinite_scan_keeps_the_first_bad_chunk_when_threads_race():
    """Every chunk bad and three threads released at once, many times: whichever finds one
    later, the answer is the first (the lowering of the shared index is atomic)."""
    arrays = [np.full(native.NonfiniteScan.CHUNK, np.nan, F32) for _ in range(4)]
    wrong = 0
    for _ in range(200):
        scan = native.host().nonfinite_scan(arrays)
        start = threading.Barrier(3)
        threads = [threading.Thread(target=lambda: (start.wait(), scan())) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wrong += scan.first() != 0
    assert wrong == 0


def test_host_functions_refuse_other_dtypes_and_layouts_and_follow_qgraph_native(monkeypatch):
    host = native.host()
    with pytest.raises(ValueError, match="float32"):
        host.nonfinite_scan([np.zeros(3)])
    with pytest.raises(ValueError, match="C-contiguous"):
        host.scale_rows([np.zeros((4, 4), F32).T], [np.zeros((4, 4), F32)], [np.ones(4, F32)])
    with pytest.raises(ValueError, match="a scale per row"):
        host.scale_rows([np.zeros((4, 4), F32)], [np.zeros((4, 4), F32)], [np.ones(3, F32)])
    monkeypatch.setenv("QGRAPH_NATIVE", "0")
    assert native.host() is None
