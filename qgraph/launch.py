"""Start MXNet's parameter-server kvstore (dist_sync, dist_device_sync, dist_async) on this
machine: one scheduler, S servers and N workers, each a process told its role and the
scheduler's address through DMLC_* environment variables::

    python -m qgraph.launch -n 2 -s 1 -- python tools/train.py --kvstore dist_sync ...

MXNet's bundled tools/launch.py does not run on Python 3.11 (its dmlc_tracker calls
Thread.isAlive) and leaves processes behind when one fails; this launcher replaces it.

* The scheduler and servers run ``python -c "import mxnet"``: importing mxnet with DMLC_ROLE
  set to scheduler/server runs the kvstore server loop, which returns once every worker
  has finished. That is also why this module imports the standard library and
  qgraph.errors only, never mxnet: the launcher must not become a server itself.
* Workers run COMMAND with QGRAPH_WORKER_INDEX (0..N-1) set. Each server and worker gets
  its own listening port through ps-lite's PORT variable, in ascending order, because the
  scheduler ranks nodes by sorting their (host, port), not by connection order; so
  kv.rank equals QGRAPH_WORKER_INDEX unless a port was taken meanwhile. Shard by kv.rank.
* Every output line is prefixed with its process: ``[scheduler]``, ``[server 0]``,
  ``[worker 1]``.
* The launcher exits with the status of the first process that failed (128+N for signal
  N), 0 when every process exited 0. A failure, or SIGINT/SIGTERM/SIGHUP to the launcher,
  stops every process group (SIGTERM, then SIGKILL after --grace seconds): ps-lite has
  no heartbeat by default, so without this the survivors would wait forever.
* A worker that fails *after* mx.kv.create does not exit by itself: the kvstore's
  destructor waits for every other worker at a barrier. Wrap the worker's body in
  ``with fail_fast():`` (below) so that a failure ends the process and the launcher
  stops the job.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import BinaryIO, Sequence

from .errors import ConfigError

__all__ = ["main", "run", "fail_fast"]

PROG = "qgraph.launch"
WORKER_INDEX_ENV = "QGRAPH_WORKER_INDEX"
SERVER_ARGV = ("-c", "import mxnet")  # run with sys.executable
DEFAULT_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
DEFAULT_LINGER = 10.0  # seconds scheduler/servers may outlive the workers
_POLL = 0.05
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_EPILOG = """\
environment given to every process:
  DMLC_ROLE            scheduler | server | worker
  DMLC_PS_ROOT_URI     --host (the scheduler's address)
  DMLC_PS_ROOT_PORT    --port (the scheduler's port)
  DMLC_NUM_SERVER      -s
  DMLC_NUM_WORKER      -n
  DMLC_NODE_HOST       --host (servers and workers: the address they listen on)
  PORT                 servers and workers: a free port, ascending by index,
                       so that kv.rank == QGRAPH_WORKER_INDEX
  QGRAPH_WORKER_INDEX  workers: 0..N-1 in launch order
  PYTHONUNBUFFERED=1
Other variables are inherited, e.g. PS_VERBOSE=1 (ps-lite connection log) or
PS_VERBOSE=2 (every message).

exit status: 0 when every process exits 0; else the status of the first
process that failed (128+N if killed by signal N; 128+N also when the
launcher gets signal N); 1 if the scheduler/servers outlive the workers by
--linger seconds (the workers never created a dist kvstore); 2 for usage
errors, including a port in use.

several hosts (no launcher; start one line per role on its host, any order).
Example: scheduler on 10.0.0.1:9091, a server and a worker on each of
10.0.0.1 and 10.0.0.2:
  10.0.0.1$ DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=10.0.0.1 DMLC_PS_ROOT_PORT=9091 DMLC_NUM_SERVER=2 DMLC_NUM_WORKER=2 python -c 'import mxnet'
  10.0.0.1$ DMLC_ROLE=server DMLC_PS_ROOT_URI=10.0.0.1 DMLC_PS_ROOT_PORT=9091 DMLC_NUM_SERVER=2 DMLC_NUM_WORKER=2 DMLC_NODE_HOST=10.0.0.1 python -c 'import mxnet'
  10.0.0.2$ DMLC_ROLE=server DMLC_PS_ROOT_URI=10.0.0.1 DMLC_PS_ROOT_PORT=9091 DMLC_NUM_SERVER=2 DMLC_NUM_WORKER=2 DMLC_NODE_HOST=10.0.0.2 python -c 'import mxnet'
  10.0.0.1$ DMLC_ROLE=worker DMLC_PS_ROOT_URI=10.0.0.1 DMLC_PS_ROOT_PORT=9091 DMLC_NUM_SERVER=2 DMLC_NUM_WORKER=2 DMLC_NODE_HOST=10.0.0.1 python tools/train.py --kvstore dist_sync ...
  10.0.0.2$ DMLC_ROLE=worker DMLC_PS_ROOT_URI=10.0.0.1 DMLC_PS_ROOT_PORT=9091 DMLC_NUM_SERVER=2 DMLC_NUM_WORKER=2 DMLC_NODE_HOST=10.0.0.2 python tools/train.py --kvstore dist_sync ...
DMLC_NODE_HOST (or DMLC_INTERFACE=eth0) picks the address a node announces;
without either, ps-lite takes the first non-loopback interface.  Ranks are
assigned once all nodes have registered, by sorting (DMLC_NODE_HOST, PORT):
host strings in descending order, then ports ascending; set PORT=... per
node to fix them.  Nothing watches the hosts: if one process dies the others
block forever (ps-lite's PS_HEARTBEAT_INTERVAL is off by default), so stop
them by hand.
"""


@contextlib.contextmanager
def fail_fast():
    """Worker side: make an uncaught exception end this process at once.

    A dist kvstore worker that fails after ``mx.kv.create`` does not exit:
    freeing the kvstore at interpreter exit waits for pending pushes/pulls
    and then for every other worker at a barrier, so the launcher never sees
    the failure.  Inside ``with fail_fast():`` an exception (or
    ``sys.exit(code)`` with code != 0) prints its traceback, flushes stdout
    and stderr and calls ``os._exit`` (status 1, or the exit code), so the
    launcher stops the job.  ``finally`` blocks inside the body still run;
    atexit handlers do not.  A normal exit keeps the barrier that shuts the
    servers down cleanly::

        with fail_fast():
            train(mx.kv.create("dist_sync"))
    """
    try:
        yield
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            raise
        if isinstance(exc.code, int):
            status = exc.code
        else:
            print(exc.code, file=sys.stderr)
            status = 1
        _flush_and_exit(status)
    except BaseException:  # noqa: BLE001 - reported, then the process ends
        traceback.print_exc()
        _flush_and_exit(1)


def _flush_and_exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


@dataclass
class _Child:
    name: str  # "scheduler", "server 0", "worker 1"
    role: str
    popen: subprocess.Popen
    pumps: list[threading.Thread] = field(default_factory=list)

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session: the child leads its group

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _live_groups(children: Sequence[_Child]) -> list[_Child]:
    """The children whose process group still has a process that is not a zombie.

    Reaps the children first.  Zombies are skipped because an orphaned
    grandchild stays a zombie until init reaps it, which may be never.
    Without /proc, any member counts (os.killpg(pgid, 0)).
    """
    for child in children:
        child.popen.poll()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [c for c in children if _killpg_probe(c.pgid)]
    live_pgids = set()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()  # state, ppid, pgrp, ...
        except OSError:  # exited meanwhile
            continue
        if fields[0] != b"Z":
            live_pgids.add(int(fields[2]))
    return [c for c in children if c.pgid in live_pgids]


def _killpg_probe(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _resolve_host(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise ConfigError(f"cannot resolve --host {host}: {exc}") from None


def _check_port_free(host: str, port: int) -> None:
    """Bind-test host:port the way zmq binds it (SO_REUSEADDR)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port} on {host} is in use: pick another or leave --port out") from None
        raise ConfigError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    finally:
        sock.close()


def _free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports the kernel reports free on host, ascending."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return sorted(s.getsockname()[1] for s in socks)
    except OSError as exc:
        raise ConfigError(f"cannot bind {host}: {exc.strerror or exc}") from None
    finally:
        for sock in socks:
            sock.close()


def _check_command(command: Sequence[str]) -> None:
    exe = command[0]
    if os.sep in exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise ConfigError(f"COMMAND {exe} is not an executable file")
    elif shutil.which(exe) is None:
        raise ConfigError(f"COMMAND {exe} not found on PATH")


class _Job:
    """The running processes, their output pumps and the stop logic."""

    def __init__(self, out: BinaryIO, err: BinaryIO, grace: float, linger: float):
        self.out, self.err = out, err
        self.grace, self.linger = grace, linger
        self.children: list[_Child] = []
        self.lock = threading.Lock()
        self.signum: int | None = None  # last signal received by the launcher
        self.signal_count = 0

    # -- output -----------------------------------------------------------
    def write(self, stream: BinaryIO, data: bytes) -> None:
        with self.lock:
            try:
                stream.write(data)
                stream.flush()
            except (OSError, ValueError):  # closed pipe downstream: drop
                pass

    def say(self, message: str) -> None:
        self.write(self.err, f"{PROG}: {message}\n".encode())

    def _pump(self, pipe: BinaryIO, prefix: bytes, stream: BinaryIO) -> None:
        with pipe:
            for line in iter(pipe.readline, b""):
                if not line.endswith(b"\n"):
                    line += b"\n"
                self.write(stream, prefix + line)

    # -- processes --------------------------------------------------------
    def start(self, name: str, role: str, argv: Sequence[str], env: dict) -> None:
        popen = subprocess.Popen(
            list(argv), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        child = _Child(name, role, popen)
        prefix = f"[{name}] ".encode()
        for pipe, stream in ((popen.stdout, self.out), (popen.stderr, self.err)):
            pump = threading.Thread(target=self._pump, args=(pipe, prefix, stream),
                                    name=f"pump {name}", daemon=True)
            pump.start()
            child.pumps.append(pump)
        self.children.append(child)

    def on_signal(self, signum: int, _frame) -> None:
        self.signum = signum
        self.signal_count += 1

    def watch(self) -> tuple[int, str | None]:
        """Wait for all children; return (status, reason) at the first failure."""
        pending = list(self.children)
        workers_done_at = None
        while True:
            if self.signum is not None:
                name = signal.Signals(self.signum).name
                return 128 + self.signum, f"received {name}; stopping all processes"
            for child in list(pending):
                rc = child.popen.poll()
                if rc is None:
                    continue
                pending.remove(child)
                if rc != 0:
                    return _status(rc), f"{child.name} {_describe(rc)}; stopping the others"
            if not pending:
                return 0, None
            if workers_done_at is None:
                if not any(c.role == "worker" for c in pending):
                    workers_done_at = time.monotonic()
            elif time.monotonic() - workers_done_at > self.linger:
                names = ", ".join(c.name for c in pending)
                return 1, (f"all workers exited 0 but {names} still running after "
                           f"{self.linger:g}s (did every worker create a dist kvstore?); "
                           "stopping them")
            time.sleep(_POLL)

    def stop(self) -> list[str]:
        """SIGTERM every live process group, SIGKILL after the grace period.

        Returns the names of the children whose group had to be signalled.
        """
        live = _live_groups(self.children)
        if not live:
            return []
        seen = self.signal_count
        for child in live:
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and _live_groups(live):
            if self.signal_count != seen:  # signalled again: no more grace
                break
            time.sleep(_POLL)
        killed = _live_groups(live)
        for child in killed:
            child.signal_group(signal.SIGKILL)
        if killed:
            self.say("sent SIGKILL to " + ", ".join(c.name for c in killed))
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _live_groups(killed):
            time.sleep(_POLL)
        return [c.name for c in live]

    def drain(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for child in self.children:
            for pump in child.pumps:
                pump.join(max(0.0, deadline - time.monotonic()))


def _environments(host: str, port: int, num_servers: int, num_workers: int) -> tuple:
    base = dict(os.environ)
    for name in ("PORT", "DMLC_RANK", "DMLC_ROLE", WORKER_INDEX_ENV):
        base.pop(name, None)  # an inherited PORT would make every node bind it
    base.update(DMLC_PS_ROOT_URI=host, DMLC_PS_ROOT_PORT=str(port),
                DMLC_NUM_SERVER=str(num_servers), DMLC_NUM_WORKER=str(num_workers),
                PYTHONUNBUFFERED="1")
    scheduler = dict(base, DMLC_ROLE="scheduler")
    node_ports = _free_ports(host, num_servers + num_workers)
    servers = [dict(base, DMLC_ROLE="server", DMLC_NODE_HOST=host, PORT=str(p))
               for p in node_ports[:num_servers]]
    workers = [dict(base, DMLC_ROLE="worker", DMLC_NODE_HOST=host, PORT=str(p),
                    **{WORKER_INDEX_ENV: str(i)})
               for i, p in enumerate(node_ports[num_servers:])]
    return scheduler, servers, workers


def run(command: Sequence[str], num_workers: int, num_servers: int = 1, *,
        host: str = "127.0.0.1", port: int | None = None,
        grace: float = DEFAULT_GRACE, linger: float = DEFAULT_LINGER,
        out: BinaryIO | None = None, err: BinaryIO | None = None) -> int:
    """Run scheduler, servers and workers; return the exit status.

    Raises ConfigError (nothing started) for bad arguments or a busy port.
    Must be called from the main thread (it installs signal handlers).
    """
    if num_workers < 1:
        raise ConfigError(f"-n must be at least 1, got {num_workers}")
    if num_servers < 1:
        raise ConfigError(f"-s must be at least 1, got {num_servers}")
    if not command:
        raise ConfigError("missing COMMAND; give it after --")
    if grace < 0 or linger < 0:
        raise ConfigError("--grace and --linger must be >= 0")
    _check_command(command)
    host = _resolve_host(host)
    if port is None:
        port = _free_ports(host, 1)[0]
    elif not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    else:
        _check_port_free(host, port)
    scheduler_env, server_envs, worker_envs = _environments(
        host, port, num_servers, num_workers)

    job = _Job(out or sys.stdout.buffer, err or sys.stderr.buffer, grace, linger)
    previous = {s: signal.signal(s, job.on_signal) for s in _HANDLED_SIGNALS}
    try:
        status, reason = 0, None
        server_argv = [sys.executable, *SERVER_ARGV]
        plan = [("scheduler", "scheduler", server_argv, scheduler_env)]
        plan += [(f"server {i}", "server", server_argv, env)
                 for i, env in enumerate(server_envs)]
        plan += [(f"worker {i}", "worker", command, env)
                 for i, env in enumerate(worker_envs)]
        for name, role, argv, env in plan:
            if job.signum is not None:
                break
            try:
                job.start(name, role, argv, env)
            except OSError as exc:
                status, reason = 127, f"cannot start {name}: {exc}; stopping the others"
                break
        job.say(f"scheduler at {host}:{port}; " + ", ".join(
            f"{c.name} pid {c.popen.pid}" for c in job.children))
        if reason is None:
            status, reason = job.watch()
        if reason is not None:
            job.say(reason)
        began = time.monotonic()
        stopped = job.stop()  # also sweeps leftover grandchildren after success
        if stopped:
            job.say(f"stopped {', '.join(stopped)} in {time.monotonic() - began:.1f}s")
        job.drain()
        return status
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{PROG}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m qgraph.launch",
        usage="%(prog)s -n WORKERS -s SERVERS [--port P] [--host H] -- COMMAND...",
        description="Start an MXNet dist kvstore job on this machine: one scheduler, "
                    "SERVERS servers (python -c 'import mxnet') and WORKERS copies of "
                    "COMMAND, with prefixed output; stop them all if any fails.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-workers", type=int, required=True, metavar="WORKERS",
                        help="number of worker processes running COMMAND (>= 1)")
    parser.add_argument("-s", "--num-servers", type=int, required=True, metavar="SERVERS",
                        help="number of kvstore server processes (>= 1)")
    parser.add_argument("--port", type=int, default=None,
                        help="scheduler port (default: a free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the scheduler, servers and workers listen on "
                             "(default: 127.0.0.1)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SEC",
                        help="seconds between SIGTERM and SIGKILL when stopping "
                             f"(default: {DEFAULT_GRACE:g})")
    parser.add_argument("--linger", type=float, default=DEFAULT_LINGER, metavar="SEC",
                        help="seconds the scheduler/servers may keep running after all "
                             f"workers exited 0 (default: {DEFAULT_LINGER:g})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (put COMMAND after --)")
    try:
        return run(command, args.num_workers, args.num_servers, host=args.host,
                   port=args.port, grace=args.grace, linger=args.linger)
    except ConfigError as exc:
        parser.error(str(exc))
        return 2  # not reached


if __name__ == "__main__":
    sys.exit(main())
