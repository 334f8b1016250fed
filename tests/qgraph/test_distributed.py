"""qgraph.distributed: the DMLC environment is checked before MXNet sees it, a missing scheduler
is an error instead of a hang, BatchNorm running statistics are averaged over contexts, and in
a real dist_sync job (qgraph.launch) every worker calibrates the same input thresholds from the
same data, while a worker that computed others is stopped naming the difference."""
import json
import socket
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN, ROOT, launch, worker_lines

import passes
import qgraph
from qgraph import distributed
from qgraph.data import calibration_subset

WORKER_ENV = {"DMLC_ROLE": "worker", "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9091",
              "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "4"}


def test_single_process_kvstores_have_one_worker():
    assert distributed.worker_count("device", {}) == distributed.worker_count("local", {}) == 1
    workers = distributed.join("local", {})
    assert (workers.rank, workers.count, workers.distributed) == (0, 1, False)
    assert workers.trainer_options() == {"kvstore": "local", "update_on_kvstore": False}


def test_a_dist_kvstore_reads_the_worker_count_from_the_environment():
    assert distributed.worker_count("dist_sync", WORKER_ENV) == 4


@pytest.mark.parametrize("kvstore, env, message", [
    ("dist_sync", {}, "--kvstore dist_sync needs a worker's DMLC environment (DMLC_ROLE, DMLC_PS_ROOT_URI, "
                      "DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER, DMLC_NUM_WORKER unset): start the workers with "
                      "python -m qgraph.launch"),
    ("dist_async", dict(WORKER_ENV, DMLC_PS_ROOT_URI=""), "(DMLC_PS_ROOT_URI unset)"),
    ("dist_sync", dict(WORKER_ENV, DMLC_ROLE="server"), "runs in workers, but DMLC_ROLE is 'server'"),
    ("dist_sync", dict(WORKER_ENV, DMLC_NUM_WORKER="two"), "DMLC_NUM_WORKER='two' is not a positive integer"),
    ("dist_sync", dict(WORKER_ENV, DMLC_PS_ROOT_PORT="70000"), "DMLC_PS_ROOT_PORT=70000 is not a port"),
    ("device", WORKER_ENV, "DMLC_ROLE=worker is set (a qgraph.launch job?) but --kvstore device trains alone"),
    ("nccl", {}, "--kvstore 'nccl' is not one of device, local, dist_sync, dist_device_sync, dist_async"),
])
def test_a_wrong_environment_is_one_config_error(kvstore, env, message):
    with pytest.raises(qgraph.ConfigError) as caught:
        distributed.join(kvstore, env)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_worker_gives_up_when_no_scheduler_answers():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(WORKER_ENV, DMLC_PS_ROOT_PORT=str(port))
    with pytest.raises(qgraph.ConfigError, match=f"no kvstore scheduler answers at DMLC_PS_ROOT_URI=127.0.0.1 "
                                                 f"DMLC_PS_ROOT_PORT={port} after 0.5 s"):
        distributed.join("dist_sync", env, wait=0.5)


def test_dist_async_updates_on_the_servers():
    assert distributed.Workers("dist_async").trainer_options()["update_on_kvstore"] is True
    assert distributed.Workers("dist_sync").trainer_options()["update_on_kvstore"] is False


def test_running_statistics_are_averaged_over_contexts_and_nothing_else():
    contexts = [mx.cpu(0), mx.cpu(1)]
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Dense(3), mx.gluon.nn.BatchNorm())
    net.initialize(ctx=contexts)
    net(mx.nd.ones((2, 4), ctx=contexts[0]))
    params = net.collect_params()
    weight = [p for name, p in params.items() if name.endswith("dense0_weight")][0]
    weight_before = weight.data(contexts[0]).asnumpy()
    stats = [p for name, p in params.items() if name.endswith(("running_mean", "running_var"))]
    for i, param in enumerate(stats):
        for j, array in enumerate(param.list_data()):
            array[:] = mx.nd.array([i + 10 * j, 1.0 + j, 2.0], ctx=array.context)
    distributed.Workers().average_statistics(params.values())
    for i, param in enumerate(stats):
        first, second = (a.asnumpy() for a in param.list_data())
        np.testing.assert_array_equal(first, second)
        np.testing.assert_array_equal(first, [i + 5, 1.5, 2.0])
    np.testing.assert_array_equal(weight.data(contexts[1]).asnumpy(), weight_before)


WORKER = textwrap.dedent("""\
    import json, sys
    sys.path.insert(0, {root!r})
    import numpy as np
    import passes, qgraph
    from qgraph import distributed
    from qgraph.data import calibration_subset
    from qgraph.launch import fail_fast

    with fail_fast():
        workers = distributed.join("dist_sync")
        net = passes.quantize(qgraph.load({model!r}), qgraph.QuantConfig(weight_bits=4, input_bits=4, online=False))
        images = calibration_subset("mnist", per_class=3, seed=7)
        if sys.argv[1] == "different" and workers.rank == 1:
            images = images[::-1][:10]
        net.calibrate(images, "naive", progress=False)
        print("thresholds", json.dumps(net.thresholds()), flush=True)
        workers.check_same("input thresholds", net.thresholds())
        print("agreed", flush=True)
""").format(root=str(ROOT), model=f"{MNIST_CNN}-symbol.json")


@pytest.fixture(scope="module")
def worker_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("workers") / "calibrate.py"
    path.write_text(WORKER)
    return path


def _thresholds(lines):
    return json.loads(next(line for line in lines if line.startswith("thresholds "))[len("thresholds "):])


@pytest.mark.slow
def test_every_worker_calibrates_the_same_thresholds(worker_script):
    job = launch(2, sys.executable, worker_script, "same")
    assert job.returncode == 0, job.stderr
    first, second = (worker_lines(job.stdout, rank) for rank in (0, 1))
    assert "agreed" in first and "agreed" in second
    net = passes.quantize(qgraph.load(f"{MNIST_CNN}-symbol.json"), qgraph.QuantConfig(weight_bits=4, input_bits=4,
                                                                                     online=False))
    net.calibrate(calibration_subset("mnist", per_class=3, seed=7), "naive", progress=False)
    assert _thresholds(first) == _thresholds(second) == net.thresholds()


@pytest.mark.slow
def test_a_worker_with_other_thresholds_is_stopped_naming_the_difference(worker_script):
    job = launch(2, sys.executable, worker_script, "different")
    assert job.returncode == 1, job.stderr
    assert _thresholds(worker_lines(job.stdout, 0)) != _thresholds(worker_lines(job.stdout, 1))
    errors = [line for line in worker_lines(job.stderr, 1) if "Error" in line]
    assert errors and "DataError: input thresholds differ between workers" in errors[-1]
    assert "on rank 1 but" in errors[-1] and "every worker must compute them from the same data" in errors[-1]
    assert "qgraph.launch: worker 1 exited with status 1; stopping the others" in job.stderr
