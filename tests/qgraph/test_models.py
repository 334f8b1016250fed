"""qgraph.models: exported files, the models qgraph ships, zoo networks with either params format,
and errors that say which flag or file to fix."""
import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN

import qgraph
from qgraph import ConfigError, GraphError, models


def test_an_exported_model_and_a_shipped_one_are_the_same_graph():
    exported = models.load_model(symbol=f"{MNIST_CNN}-symbol.json", input_shape=(1, 1, 28, 28))
    shipped = models.load_model("mnist_cnn", input_shape=(1, 1, 28, 28))
    assert exported.to_json() == shipped.to_json() and exported.input_shapes == {"data": (1, 1, 28, 28)}
    assert models.shipped_prefix("mobilenet0.5", "cifar10").name == "mobilenet0.5_cifar10"
    assert models.shipped_prefix("no_such_net") is None


def test_the_bundled_network_builds_and_its_two_params_formats_load(tmp_path):
    net = models.build_network("mnist_cnn", classes=10)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    x = mx.nd.array(np.random.RandomState(0).rand(2, 1, 28, 28))
    expected = net(x).asnumpy()
    net.save_parameters(str(tmp_path / "saved.params"))
    net.export(str(tmp_path / "exported"))
    for params in (tmp_path / "saved.params", tmp_path / "exported-0000.params"):
        graph = models.load_model("mnist_cnn", params=params, input_shape=(2, 1, 28, 28))
        np.testing.assert_allclose(qgraph.to_block(graph)(x).asnumpy(), expected, rtol=1e-5, atol=1e-6)


def test_params_of_another_model_are_refused_naming_the_file(tmp_path):
    other = mx.gluon.nn.Dense(3)
    other.initialize()
    other(mx.nd.zeros((1, 4)))
    other.save_parameters(str(tmp_path / "other.params"))
    with pytest.raises(GraphError, match="other.params: does not fit --model"):
        models.load_model("mnist_cnn", params=tmp_path / "other.params", input_shape=(1, 1, 28, 28))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="not_a_model"), "not a model-zoo name"),
    (dict(name="resnet18_v1"), "no weights; pass --params"),
    (dict(), "give a model name"),
    (dict(symbol=f"{MNIST_CNN}-symbol.json", pretrained=True), "apply to --model"),
    (dict(symbol="/nowhere/m-symbol.json"), "/nowhere/m-symbol.json: no such symbol file"),
    (dict(name="mnist_cnn", pretrained=True), "no zoo weights"),
])
def test_errors_name_the_flag_or_file(kwargs, message):
    with pytest.raises((ConfigError, GraphError), match=message):
        models.load_model(input_shape=(1, 1, 28, 28), **kwargs)


def test_names_and_description():
    names = models.model_names()
    assert names[0] == "mnist_cnn" and "cifar_resnet20_v1" in names
    text = models.describe(models.load_model("mnist_cnn"))
    assert text.splitlines()[0].split() == ["Convolution", "mnistcnn_conv0_fwd"]
