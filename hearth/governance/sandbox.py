"""`--sandbox`: the kernel keeps the whole process off the network, native code and child processes included.

The offline guard (offline.py) lives in Python: a C extension, ctypes, uvloop or a subprocess opens sockets without
passing it. The sandbox moves the process into a network namespace of its own, which the kernel creates with a single
interface, its own loopback, and no route: every socket made afterwards, by any code in the process or its children,
lives there, and connect() or sendto() to any address but that loopback fails with ENETUNREACH. A socket keeps the
namespace it was created in, and so do the connections it accepts: `hearth serve --sandbox` binds its listening socket
first (`listening_socket`), so the API stays reachable from the host while nothing in the process can reach out.
127.0.0.1 inside the process is the namespace's own loopback, not the host's, so local services (a proxy on the
host's loopback, say) are out of reach too.

How: `enter_sandbox()` calls unshare(CLONE_NEWUSER | CLONE_NEWNET) through ctypes (Python 3.11 has no os.unshare; it
is one libc call, so no dependency). The user namespace comes first for two reasons: an unprivileged user needs it to
create a network namespace, and for root it takes away the capabilities in the host's user namespace that would let
code setns() back into the host's network namespace or ptrace a process outside. IDs map to themselves, so files
are read and written as before: an unprivileged user maps its own uid and gid (the most it may), root maps every ID
the current namespace has, written by a short-lived child that stays outside (only a process outside the new
namespace may map more than its own ID). unshare(CLONE_NEWUSER) needs a single-threaded process, and unshare moves
only the calling thread, so a thread started before it would keep the host's network: the sandbox refuses unless the
process has exactly one thread (`serve` and `run` apply it before PyTorch starts any). Afterwards the sandbox checks
that the process sees a new network namespace whose only interface is `lo`, and raises `SandboxError` otherwise.

No seccomp filter: the official libseccomp bindings are not on PyPI and pyseccomp has seen no release since 2021,
and inside the empty namespace AF_PACKET and raw sockets reach only the namespace's own loopback, so a filter would
add nothing to this guarantee.

Not covered: Unix sockets (their names live in the file system, not in the network namespace), so a daemon on the
host that listens on one (a proxy, a container runtime) can still be asked to reach out; descriptors inherited
already connected; and, for root, files root may write.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
import sys

logger = logging.getLogger(__name__)

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sH22x"  # struct ifreq: the name, then ifr_flags in a 24-byte union


class SandboxError(OSError):
    """The sandbox could not be applied; `--sandbox` refuses to go on without it (one line for the user)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"--sandbox: {reason}; refusing to run without it")


def thread_count() -> int:
    """Threads of this process, native ones included (`threading` sees only those Python started)."""
    return len(os.listdir("/proc/self/task"))


def network_namespace() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def interfaces() -> set[str]:
    """The network interfaces this process's network namespace has."""
    with open("/proc/self/net/dev") as f:
        return {line.split(":", 1)[0].strip() for line in f.readlines()[2:] if ":" in line}


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound and listening on (host, port), as uvicorn would bind it; it keeps the namespace it is made in."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _unshare(flags: int) -> int:
    """libc's unshare(2): 0, or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        return ctypes.get_errno() or errno.EPERM
    return 0


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())  # an ID map must be written in one write()
    finally:
        os.close(fd)


def _identity_map(kind: str) -> str:
    """Every ID range of this process's user namespace, mapped to itself (as lines of an ID map file)."""
    with open(f"/proc/self/{kind}_map") as f:
        ranges = [line.split() for line in f if line.strip()]
    return "".join(f"{inside} {inside} {count}\n" for inside, _outside, count in ranges)


def _unshare_as_root() -> int:
    """unshare(CLONE_NEWUSER | CLONE_NEWNET), every ID mapped by a child that stays in the parent user namespace."""
    parent = os.getpid()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only writes the maps and leaves
        status = 1
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) == b"1":  # the parent unshared
                _write(f"/proc/{parent}/uid_map", _identity_map("uid"))
                _write(f"/proc/{parent}/gid_map", _identity_map("gid"))
                status = 0
        finally:
            os._exit(status)
    os.close(ready_r)
    error = _unshare(CLONE_NEWUSER | CLONE_NEWNET)
    os.write(ready_w, b"0" if error else b"1")
    os.close(ready_w)
    _, status = os.waitpid(child, 0)
    if error:
        return error
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise SandboxError("could not map user and group IDs into the new user namespace")
    return 0


def _unshare_as_user(uid: int, gid: int) -> int:
    error = _unshare(CLONE_NEWUSER | CLONE_NEWNET)
    if error:
        return error
    try:
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/setgroups", "deny")  # required before an unprivileged process writes its gid_map
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    except OSError as e:
        raise SandboxError(f"could not map user and group IDs into the new user namespace ({e.strerror})") from None
    return 0


def _loopback_up() -> None:
    """Bring up the namespace's own loopback, so loopback traffic inside the process keeps working."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        (_, flags) = struct.unpack(_IFREQ, fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0)))
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | IFF_UP))


def enter_sandbox() -> None:
    """Move this process into a new user and network namespace (see the module docstring); `SandboxError` when that
    cannot be done or checked. Call it while the process has one thread, after binding any listening socket."""
    if not sys.platform.startswith("linux"):
        raise SandboxError("network namespaces need Linux")
    threads = thread_count()
    if threads != 1:
        raise SandboxError(f"the process already runs {threads} threads (it must have one when the sandbox starts)")
    before = network_namespace()
    uid, gid = os.geteuid(), os.getegid()
    error = _unshare_as_root() if uid == 0 else _unshare_as_user(uid, gid)
    if error:
        raise SandboxError(f"the kernel refused a new user and network namespace ({os.strerror(error)})")
    try:
        _loopback_up()
    except OSError as e:  # the isolation stands without it; only loopback inside the process is lost
        logger.warning("sandbox: could not bring up the namespace's loopback (%s)", e.strerror)
    seen = interfaces()
    if network_namespace() == before or seen - {"lo"}:
        raise SandboxError(f"the process did not end up in an empty network namespace (interfaces: {sorted(seen)})")
    logger.info("sandbox: in a network namespace of its own (interfaces: lo)")


def sandboxed_listener(host: str, port: int) -> socket.socket:
    """`hearth serve --sandbox`: bind (host, port) in the host's network namespace, then enter the sandbox; the
    returned socket is what the server serves on. Closed again when the sandbox cannot be applied."""
    sock = listening_socket(host, port)
    try:
        enter_sandbox()
    except BaseException:
        sock.close()
        raise
    return sock
