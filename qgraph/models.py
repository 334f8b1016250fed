"""Small networks the project trains itself and ships under models/ as bundled defaults."""
from __future__ import annotations


def mnist_cnn(classes: int = 10):
    """A 28x28 digit classifier with the layer kinds quantization cares about: a first conv,
    a depthwise conv, a 1x1 conv, a 3x3 stride-1 conv (Winograd-eligible), BatchNorm after
    each, and a FullyConnected head."""
    from mxnet.gluon import nn

    net = nn.HybridSequential(prefix="mnistcnn_")
    with net.name_scope():
        net.add(nn.Conv2D(16, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
                nn.MaxPool2D(2),
                nn.Conv2D(16, 3, padding=1, groups=16, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
                nn.Conv2D(32, 1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
                nn.MaxPool2D(2),
                nn.Conv2D(32, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
                nn.GlobalAvgPool2D(), nn.Flatten(),
                nn.Dense(classes))
    return net


BUNDLED = {"mnist_cnn": mnist_cnn}
