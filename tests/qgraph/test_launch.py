"""qgraph.launch end to end, with real scheduler, server and worker processes: ranks follow the
launch index, output is prefixed, the first failure's status is the launcher's, and a worker
that fails or is killed mid-run gets every other process stopped within 30 s, grandchildren
included; bad arguments and a port in use are one line and exit 2, before mxnet is imported.

Each test starts the launcher as a subprocess; workers run WORKER (below), which records its
pid (and its grandchild's) in tmp_path so the tests can check that nothing outlives the
launcher.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
LAUNCH = [PY, "-m", "qgraph.launch"]
STOP_LIMIT = 30.0  # seconds allowed between a fault and everything being gone

WORKER = textwrap.dedent("""\
    import os, subprocess, sys, time
    sys.path.insert(0, {root!r})
    from qgraph.launch import fail_fast
    out_dir, modes = sys.argv[1], sys.argv[2:]
    index = int(os.environ["QGRAPH_WORKER_INDEX"])
    mode = modes[index]

    def mark(name, text=""):
        path = os.path.join(out_dir, f"{{name}}.{{index}}")
        with open(path + ".tmp", "w") as f:
            f.write(str(text))
        os.replace(path + ".tmp", path)

    mark("pid", os.getpid())
    import mxnet as mx
    with fail_fast():
        if mode == "exit3":                 # fails before joining the kvstore
            sys.exit(3)
        if mode == "exit3-when-0-ready":
            while not os.path.exists(os.path.join(out_dir, "ready.0")):
                time.sleep(0.05)
            sys.exit(3)
        if mode == "ignore-term":           # needs SIGKILL to stop
            import signal
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            mark("ready"); time.sleep(300)
        if mode == "late":                  # never joins: others block in kv.create
            mark("ready"); time.sleep(300)
        if mode == "block-create":
            mark("ready")
        kv = mx.kv.create("dist_sync")
        kv.init(7, mx.nd.zeros((2,)))
        if mode == "sum":
            kv.push(7, mx.nd.ones((2,)) * (kv.rank + 1))
            out = mx.nd.zeros((2,))
            kv.pull(7, out=out)
            print(f"index={{index}} rank={{kv.rank}} sum={{out.asnumpy()[0]:g}}")
        elif mode == "create-exit3":        # fails after joining: needs fail_fast
            while not os.path.exists(os.path.join(out_dir, "ready.0")):
                time.sleep(0.05)
            sys.exit(3)
        elif mode == "sleep":               # blocked, with a grandchild process
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
            mark("grandchild", child.pid)
            mark("ready")
            time.sleep(300)
        elif mode == "pushloop":
            out = mx.nd.zeros((2,))
            for step in range(10 ** 6):
                kv.push(7, mx.nd.ones((2,)))
                kv.pull(7, out=out)
                out.wait_to_read()
                if step == 10:
                    mark("ready")
""").format(root=str(ROOT))


def alive(pid):
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Run:
    """The launcher running in the background, its output in tmp_path."""

    def __init__(self, tmp_path, num_workers, modes, *options):
        self.dir = tmp_path
        (tmp_path / "worker.py").write_text(WORKER)
        self.out_path, self.err_path = tmp_path / "out.txt", tmp_path / "err.txt"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*LAUNCH, "-n", str(num_workers), "-s", "1", *options, "--",
                 PY, str(tmp_path / "worker.py"), str(tmp_path), *modes],
                stdout=out, stderr=err, start_new_session=True, cwd=ROOT)
        self.started = time.monotonic()

    @property
    def out(self):
        return self.out_path.read_text()

    @property
    def err(self):
        return self.err_path.read_text()

    def read(self, name, index):
        path = self.dir / f"{name}.{index}"
        return int(path.read_text()) if path.exists() and name != "ready" else path.exists()

    def wait_marks(self, name, indices, timeout=25):
        wait_for(lambda: all(self.read(name, i) for i in indices), timeout,
                 f"{name} marks of workers {indices}")

    def role_pids(self):
        """{'scheduler': pid, 'server 0': pid, 'worker 0': pid, ...} from the launcher."""
        wait_for(lambda: "scheduler pid" in self.err, 10, "the launcher's pid line")
        line = next(l for l in self.err.splitlines() if "scheduler pid" in l)
        found = re.findall(r"(scheduler|server \d+|worker \d+) pid (\d+)", line)
        return {name: int(pid) for name, pid in found}

    def all_pids(self):
        pids = set(self.role_pids().values())
        for path in self.dir.glob("*.*"):
            if path.name.split(".")[0] in ("pid", "grandchild"):
                pids.add(int(path.read_text()))
        return pids

    def wait(self, timeout):
        return self.proc.wait(timeout=timeout)

    def cleanup(self):
        """Kill anything left, so one failing test cannot leak processes."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.all_pids() if "scheduler pid" in self.err else ():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launch(tmp_path):
    runs = []

    def start(num_workers, modes, *options):
        run = Run(tmp_path, num_workers, modes, *options)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


def assert_all_gone(run, pids):
    leftover = sorted(p for p in pids if alive(p))
    assert not leftover, f"still running: {leftover}\n{run.err}"


def test_two_workers_sum_and_prefixes(launch):
    run = launch(2, ["sum", "sum"])
    assert run.wait(30) == 0, run.err
    lines = run.out.splitlines()
    # the launcher pins ports so that kv.rank == launch index == prefix
    assert "[worker 0] index=0 rank=0 sum=3" in lines, run.out
    assert "[worker 1] index=1 rank=1 sum=3" in lines, run.out
    assert_all_gone(run, run.all_pids())
    assert "stopped" not in run.err  # clean finish, nothing had to be killed


def test_worker_exit_before_kvstore_stops_everyone(launch):
    # worker 0 blocks in kv.create waiting for worker 1, which exits 3
    run = launch(2, ["block-create", "exit3"])
    assert run.wait(30) == 3, run.err
    assert "qgraph.launch: worker 1 exited with status 3; stopping the others" in run.err
    assert_all_gone(run, run.all_pids())


def test_worker_exit_after_kvstore_stops_everyone(launch):
    # worker 0 sleeps (with a grandchild) after kv.create; worker 1 exits 3
    run = launch(2, ["sleep", "create-exit3"])
    run.wait_marks("grandchild", [0])
    pids = run.all_pids()
    assert len(pids) == 5  # scheduler, server, 2 workers, grandchild
    t0 = time.monotonic()
    assert run.wait(STOP_LIMIT) == 3, run.err
    assert time.monotonic() - t0 < STOP_LIMIT
    assert "qgraph.launch: worker 1 exited with status 3; stopping the others" in run.err
    assert re.search(r"qgraph.launch: stopped scheduler, server 0, worker 0 in \d+\.\ds", run.err)
    assert_all_gone(run, pids)


def assert_a_killed_process_stops_everyone(run, pid, name):
    """SIGKILL `pid` (the launcher's `name`): the launcher exits 128 + 9 within STOP_LIMIT
    seconds, says why, and leaves nothing running."""
    pids = run.all_pids()
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert run.wait(STOP_LIMIT) == 128 + signal.SIGKILL, run.err
    assert time.monotonic() - t0 < STOP_LIMIT
    assert f"qgraph.launch: {name} was killed by signal 9 (SIGKILL); stopping the others" in run.err
    assert_all_gone(run, pids)


def test_sigkill_worker_mid_run(launch):
    run = launch(2, ["pushloop", "pushloop"])
    run.wait_marks("ready", [0, 1])
    assert_a_killed_process_stops_everyone(run, run.read("pid", 1), "worker 1")


def test_scheduler_death_while_worker_blocks_in_create(launch):
    run = launch(2, ["block-create", "late"])
    run.wait_marks("ready", [0, 1])
    time.sleep(1.0)  # worker 0 is now inside kv.create, waiting for worker 1
    assert_a_killed_process_stops_everyone(run, run.role_pids()["scheduler"], "scheduler")


def test_sigkill_after_grace_when_sigterm_is_ignored(launch):
    run = launch(2, ["ignore-term", "exit3-when-0-ready"], "--grace", "1")
    assert run.wait(STOP_LIMIT) == 3, run.err
    assert "qgraph.launch: sent SIGKILL to worker 0" in run.err
    assert re.search(r"qgraph.launch: stopped scheduler, server 0, worker 0 in 1\.\ds", run.err), run.err
    assert_all_gone(run, run.all_pids())


def test_sigterm_to_launcher_stops_everyone(launch):
    run = launch(2, ["sleep", "sleep"])
    run.wait_marks("grandchild", [0, 1])
    pids = run.all_pids()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(STOP_LIMIT) == 128 + signal.SIGTERM, run.err
    assert "qgraph.launch: received SIGTERM; stopping all processes" in run.err
    assert_all_gone(run, pids)


def test_port_in_use(tmp_path):
    marker = tmp_path / "started"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        res = subprocess.run(
            [*LAUNCH, "-n", "2", "-s", "1", "--port", str(port), "--",
             PY, "-c", f"open({str(marker)!r}, 'w')"],
            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr == (f"qgraph.launch: error: --port {port} on 127.0.0.1 is in use: pick another or "
                          "leave --port out\n")
    assert res.stdout == ""
    assert not marker.exists()


def test_the_launcher_never_imports_mxnet():
    """Importing mxnet with DMLC_ROLE=scheduler would make the launcher a kvstore node itself."""
    probe = "import sys, qgraph.launch; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mxnet'))"
    res = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=30, cwd=ROOT,
                         env=dict(os.environ, DMLC_ROLE="scheduler"))
    assert res.returncode == 0, res.stderr
    assert res.stdout == "[]\n"


@pytest.mark.parametrize("args, message", [
    (["-n", "0", "-s", "1", "--", "true"], "-n must be at least 1, got 0"),
    (["-n", "1", "-s", "0", "--", "true"], "-s must be at least 1, got 0"),
    (["-n", "1", "-s", "1"], "missing COMMAND; give it after --"),
    (["-n", "1", "-s", "1", "--"], "missing COMMAND; give it after --"),
    (["-n", "1", "-s", "1", "--", "no-such-command-xyz"],
     "COMMAND no-such-command-xyz not found on PATH"),
])
def test_argument_errors(args, message):
    res = subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr == f"qgraph.launch: error: {message}\n"
    assert res.stdout == ""


def test_help_mentions_multi_host():
    res = subprocess.run([*LAUNCH, "--help"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 0
    assert "DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=" in res.stdout
    assert "DMLC_ROLE=worker" in res.stdout and "DMLC_NODE_HOST" in res.stdout
