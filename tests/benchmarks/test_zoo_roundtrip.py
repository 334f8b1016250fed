"""benchmarks/zoo_roundtrip.py's checks, called as functions: a dozen gluoncv classification
models round-trip bit-exactly through qgraph and stay within 1e-4 after fold_bn, and the model
selection keeps classification models only."""
import pytest

from benchmarks.zoo_roundtrip import QUICK_MODELS, Skip, classification_models, run_model


@pytest.mark.parametrize("name", QUICK_MODELS)
def test_quick_model_round_trips_exactly_and_folds(name):
    try:
        result = run_model(name, tol=1e-4)
    except Skip as reason:
        pytest.skip(f"{name}: {reason}")
    assert result.problems == [], result.problems
    assert result.exact and result.fold_ok and result.nodes > 10
    assert result.rel_diff <= 1e-4


def test_selection_keeps_classification_models_only():
    names = classification_models()
    assert len(names) >= 60
    for expected in ("resnet18_v1", "cifar_resnet20_v1", "mobilenetv3_small", "hrnet_w18_c", "darknet53"):
        assert expected in names
    for excluded in ("ssd_512_resnet50_v1_voc", "yolo3_darknet53_coco", "fcn_resnet50_voc",
                     "simple_pose_resnet18_v1b", "hrnet_w48_s", "i3d_resnet50_v1_kinetics400"):
        assert excluded not in names
