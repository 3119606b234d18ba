"""Run by test_sandbox.py in a child process: `hearth serve --sandbox` with one extra route, /probe, that reports from
inside the serving process what the network looks like there (`serve ARGS...`), or the sandbox alone around a bare
listening socket (`bare [UID]`: prints the probe as JSON, answers one connection, exits; started as root with a UID,
it first drops to that user, losing every capability, to take the unprivileged path).

The probes reach past Python: connect() and sendto() through libc with ctypes (the offline guard never sees them)
and a child Python with no guard at all. They run only once the process is in a network namespace other than the
host's (HOST_NETNS, from the test) whose only interface is lo, so not even a broken sandbox lets a packet leave.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
import sys

CLONE_NEWNET = 0x40000000
CHILD_CONNECT = """
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(("192.0.2.1", 80))
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"""


class SockaddrIn(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16), ("addr", ctypes.c_char * 4),
                ("zero", ctypes.c_char * 8)]  # fmt: skip


class SockaddrIn6(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16), ("flowinfo", ctypes.c_uint32),
                ("addr", ctypes.c_char * 16), ("scope_id", ctypes.c_uint32)]  # fmt: skip


def libc_call(kind: int, how: str, family: int = socket.AF_INET) -> str:
    """socket() + connect() or sendto() to TEST-NET through libc; the errno name, or "sent"/"connected"."""
    libc = ctypes.CDLL(None, use_errno=True)
    if family == socket.AF_INET:
        address = SockaddrIn(family, socket.htons(80), socket.inet_pton(family, "192.0.2.1"))
    else:
        address = SockaddrIn6(family, socket.htons(80), 0, socket.inet_pton(family, "2001:db8::1"), 0)
    fd = libc.socket(family, kind, 0)
    if fd < 0:
        return "socket: " + errno.errorcode.get(ctypes.get_errno(), "?")
    try:
        if how == "connect":
            result = libc.connect(fd, ctypes.byref(address), ctypes.sizeof(address))
        else:
            result = libc.sendto(fd, b"x", 1, 0, ctypes.byref(address), ctypes.sizeof(address))
        return ("connected" if how == "connect" else "sent") if result == 0 else errno.errorcode[ctypes.get_errno()]
    finally:
        os.close(fd)


def child_connect() -> str:
    """A connect from a child process: a Python with no guard, or (when the interpreter is out of this user's reach)
    a forked child calling libc."""
    if os.access(sys.executable, os.X_OK) and os.access(os.path.realpath(sys.executable), os.X_OK):
        child = subprocess.run([sys.executable, "-I", "-c", CHILD_CONNECT], capture_output=True, text=True, timeout=60)
        return child.stdout.strip() or child.stderr.strip()[-200:]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the bare probe is single-threaded, so forking is safe
        os.write(write_end, libc_call(socket.SOCK_STREAM, "connect").encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    return os.read(read_end, 100).decode()


def escape_to_host_namespace() -> str:
    """setns() into PID 1's network namespace: what code would try to get out again."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open("/proc/1/ns/net", os.O_RDONLY)
    except OSError as e:
        return "open: " + errno.errorcode[e.errno]
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            return "setns: " + errno.errorcode[ctypes.get_errno()]
        return "escaped"
    finally:
        os.close(fd)


def probe() -> dict:
    from hearth.governance.sandbox import interfaces, network_namespace

    seen = sorted(interfaces())
    report = {"interfaces": seen, "own_namespace": network_namespace() != int(os.environ["HOST_NETNS"]),
              "threads": len(os.listdir("/proc/self/task")), "uid": os.getuid()}  # fmt: skip
    if not report["own_namespace"] or seen != ["lo"]:
        return report  # never try to send from a namespace that might have a route out
    report["tcp_connect"] = libc_call(socket.SOCK_STREAM, "connect")
    report["udp_sendto"] = libc_call(socket.SOCK_DGRAM, "sendto")
    report["tcp6_connect"] = libc_call(socket.SOCK_STREAM, "connect", socket.AF_INET6)
    report["child_connect"] = child_connect()
    report["escape"] = escape_to_host_namespace()
    return report


def serve(argv: list[str]) -> int:
    import hearth.cli.serve as serve_module
    from hearth.cli.main import main

    build_app = serve_module.build_app

    def build_app_with_probe(*args, **kwargs):
        app, engine = build_app(*args, **kwargs)
        app.add_api_route("/probe", probe, methods=["GET"])
        return app, engine

    serve_module.build_app = build_app_with_probe
    return main(["serve", *argv])


def bare(uid: int | None) -> int:
    from hearth.governance.sandbox import sandboxed_listener

    if uid is not None:  # everything this needs is imported above: the interpreter's files may be out of reach now
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        ctypes.CDLL(None).prctl(4, 1)  # PR_SET_DUMPABLE: as after exec, so /proc/self stays this user's (the ID maps)
    listener = sandboxed_listener("127.0.0.1", 0)
    print(json.dumps({"port": listener.getsockname()[1], **probe()}), flush=True)
    listener.settimeout(60)
    conn, _ = listener.accept()
    with conn:
        conn.sendall(b"answered from the sandbox")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "bare":
        sys.exit(bare(int(sys.argv[2]) if len(sys.argv) > 2 else None))
    sys.exit(serve(sys.argv[2:]))
