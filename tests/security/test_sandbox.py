"""`--sandbox`: the kernel keeps the serving process off the network, native code and child processes included,
while the API answers on the host's loopback; when the sandbox cannot be applied, `serve` and `run` refuse to start.

The positive tests run the sandbox in a child process (it needs a single-threaded process, and pytest's is not):
sandbox_probe.py, either around a bare listening socket or as `hearth serve smollm2 --sandbox` with one extra route
that reports from inside the server. Its probes go past the offline guard (libc through ctypes, an unguarded child
Python) and send only once the process is in a namespace of its own whose only interface is lo, to TEST-NET
addresses: no packet can leave the machine.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hearth.cli.main import main
from hearth.governance import sandbox
from hearth.governance.offline import current_guard

REPO = Path(__file__).resolve().parents[2]
PROBE = str(Path(__file__).with_name("sandbox_probe.py"))
HOST_NETNS = os.stat("/proc/self/ns/net").st_ino
NOBODY = 65534
UNREACHABLE = "ENETUNREACH"


def child_env(home: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOST_NETNS": str(HOST_NETNS)}
    if home is not None:
        env["HEARTH_HOME"] = home
    return env


@pytest.fixture(scope="module")
def kernel_refusal() -> str | None:
    """None when this kernel lets a process make its own user and network namespace, else the reason it gave."""
    code = "from hearth.governance.sandbox import enter_sandbox; enter_sandbox()"
    r = subprocess.run([sys.executable, "-c", code], env=child_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["no message"])[-1]


@pytest.fixture
def namespaces(kernel_refusal) -> None:
    if kernel_refusal is not None:
        pytest.skip(f"the kernel refuses new user/network namespaces here ({kernel_refusal}); "
                    "test_sandbox_fails_closed_where_the_kernel_refuses checks --sandbox refuses to start")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def assert_cut_off(report: dict) -> None:
    """What the probes saw inside the sandbox: no interface but lo, every way out unreachable, no way back."""
    assert report["own_namespace"] and report["interfaces"] == ["lo"], report
    assert report["tcp_connect"] == UNREACHABLE and report["udp_sendto"] == UNREACHABLE, report
    assert report["tcp6_connect"] in (UNREACHABLE, "socket: EAFNOSUPPORT"), report  # a kernel may lack IPv6
    assert report["child_connect"] == UNREACHABLE, report
    assert report["escape"] in ("open: EACCES", "open: EPERM", "setns: EPERM"), report


@pytest.mark.parametrize("user", ["this user", "unprivileged"])
def test_bare_sandbox_cuts_the_process_off_but_its_listener_answers(namespaces, user):
    if user == "unprivileged" and os.geteuid() != 0:
        pytest.skip("running as another user needs root; this user is unprivileged already")
    as_nobody = [str(NOBODY)] if user == "unprivileged" else []
    proc = subprocess.Popen([sys.executable, PROBE, "bare", *as_nobody], env=child_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        report = json.loads(line)
        assert_cut_off(report)
        assert report["uid"] == (NOBODY if as_nobody else os.getuid())  # the IDs map to themselves
        with socket.create_connection(("127.0.0.1", report["port"]), timeout=30) as s:  # from the host's namespace
            assert s.recv(100) == b"answered from the sandbox"
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow  # loads SmolLM2
def test_hearth_serve_sandbox(namespaces, tmp_path):
    """The real `hearth serve smollm2 --sandbox`: probed from inside while the API answers on 127.0.0.1 outside."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, PROBE, "serve", "smollm2", "--sandbox", "--port", str(port)],
                            env=child_env(str(tmp_path / "home")), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        with httpx.Client(base_url=url, timeout=60) as client:
            while not listening(port):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
            assert_cut_off(client.get("/probe").json())
            while (health := client.get("/health")).status_code != 200:
                assert health.json()["status"] == "loading" and time.monotonic() < deadline, health.text
                time.sleep(0.5)
            r = client.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 4, "temperature": 0,
                                                          "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "Sandbox: the process has a network namespace of its own" in out


@pytest.mark.slow  # loads SmolLM2
def test_hearth_run_sandbox(namespaces, tmp_path):
    r = subprocess.run([sys.executable, "-m", "hearth.cli.main", "run", "smollm2", "Hi", "--sandbox", "--max-tokens",
                        "4", "--temperature", "0"], env=child_env(str(tmp_path / "home")), cwd=REPO,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_sandbox_fails_closed_where_the_kernel_refuses(kernel_refusal, tmp_path):
    if kernel_refusal is None:
        pytest.skip("this kernel grants namespaces; the refusal is simulated in test_serve_and_run_fail_closed")
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "hearth.cli.main", "serve", "smollm2", "--sandbox", "--port", str(port)],
                       env=child_env(str(tmp_path / "home")), cwd=REPO, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "--sandbox" in r.stderr, r.stderr
    assert "Hearth is serving" not in r.stdout and not listening(port)


def test_a_thread_started_before_the_sandbox_makes_serve_refuse(tmp_path):
    """Real, nothing replaced: a process with a second thread cannot enter the sandbox, and serve exits 1."""
    port = free_port()
    code = ("import sys, threading; from hearth.cli.main import main; stop = threading.Event(); "
            "threading.Thread(target=stop.wait, daemon=True).start(); "
            f"sys.exit(main(['serve', 'smollm2', '--sandbox', '--port', '{port}']))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], env=child_env(str(tmp_path / "home")), cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "hearth: error: --sandbox: the process already runs 2 threads (it must have one when the sandbox starts); "
        "refusing to run without it"
    ]
    assert "Hearth is serving" not in r.stdout and not listening(port)


class FakeServer:
    runs: list = []

    def __init__(self, config) -> None:
        self.config = config
        self.should_exit = False

    def run(self, sockets=None) -> None:
        FakeServer.runs.append(sockets)


@pytest.fixture
def fake_serve(monkeypatch, home):
    """`hearth serve` up to uvicorn's loop, with a fake app; the sandbox's kernel calls replaced per test."""
    import uvicorn
    from test_api_fake import FakeEngine, make_app

    import hearth.cli.serve as serve

    FakeServer.runs = []
    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    engine = FakeEngine()
    monkeypatch.setattr(serve, "build_app", lambda *a, **kw: (make_app(engine), engine))
    monkeypatch.setattr(sandbox, "thread_count", lambda: 1)  # pytest's process has threads of its own
    return FakeServer.runs


def refused_by_the_kernel(monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "_unshare_as_root", lambda: errno.EPERM)
    monkeypatch.setattr(sandbox, "_unshare_as_user", lambda uid, gid: errno.EPERM)


def pretends_to_unshare(monkeypatch) -> None:
    """unshare 'succeeds' but the process stays where it is: the check afterwards must catch it."""
    monkeypatch.setattr(sandbox, "_unshare_as_root", lambda: 0)
    monkeypatch.setattr(sandbox, "_unshare_as_user", lambda uid, gid: 0)
    monkeypatch.setattr(sandbox, "_loopback_up", lambda: None)


def ids_cannot_be_mapped(monkeypatch) -> None:
    def fail(*args):
        raise sandbox.SandboxError("could not map user and group IDs into the new user namespace")

    monkeypatch.setattr(sandbox, "_unshare_as_root", fail)
    monkeypatch.setattr(sandbox, "_unshare_as_user", fail)


def another_thread(monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "thread_count", lambda: 3)


@pytest.mark.parametrize("failure, says", [(refused_by_the_kernel, "the kernel refused a new user and network namespace"),
                                           (pretends_to_unshare, "did not end up in an empty network namespace"),
                                           (ids_cannot_be_mapped, "could not map user and group IDs"),
                                           (another_thread, "already runs 3 threads")])  # fmt: skip
@pytest.mark.parametrize("command", ["serve", "run"])
def test_serve_and_run_fail_closed(fake_serve, monkeypatch, capsys, failure, says, command):
    import hearth.cli.run as run

    ran = []
    monkeypatch.setattr(run, "_run", lambda args: ran.append(args) or 0)
    failure(monkeypatch)
    port = free_port()
    argv = ["serve", "smollm2", "--port", str(port)] if command == "serve" else ["run", "smollm2", "hi"]
    assert main([*argv, "--sandbox"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "refusing to run without it" in err
    assert fake_serve == [] and ran == [] and current_guard() is None
    assert not listening(port)  # the socket bound before the sandbox is closed again
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("command", [["serve", "smollm2"], ["run", "smollm2", "hi"]])
def test_sandbox_and_allow_network_contradict(fake_serve, capsys, command):
    assert main([*command, "--sandbox", "--allow-network"]) == 1
    assert "cannot be combined with --allow-network" in capsys.readouterr().err and fake_serve == []


def test_without_sandbox_serve_does_not_touch_namespaces(fake_serve, monkeypatch):
    monkeypatch.setattr(sandbox, "enter_sandbox", lambda: pytest.fail("sandbox entered without --sandbox"))
    assert main(["serve", "smollm2", "--port", str(free_port())]) == 0
    assert fake_serve == [None]
