"""Install qgraph and its passes; the pinned environment is requirements.txt."""
from setuptools import setup

setup(
    name="qgraph",
    version="0.1.0",
    description="Quantization simulation and QAT for MXNet Gluon models by rewriting Symbol graphs",
    packages=["qgraph", "qgraph.analysis", "qgraph.deploy", "qgraph.recovery", "passes"],
    package_data={"qgraph": ["native/*.cc"]},  # built on first use (qgraph/native.py)
    python_requires=">=3.10",
    install_requires=["mxnet>=1.9,<2", "numpy<1.24", "networkx>=3"],
)
