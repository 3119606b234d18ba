"""The offline guard: hub libraries told to stay offline, and non-loopback sockets refused in-process.

`install_offline_guard()` sets the offline and no-telemetry variables (HF_HUB_OFFLINE, DO_NOT_TRACK, ...) and refuses,
with `OfflineError` before a packet leaves, every attempt to reach a non-loopback address or to ask the resolver
about a name other than localhost (a DNS query would leave the machine). The error names the code that tried (the
first stack frame outside the socket machinery) and a warning is logged. Unix sockets and loopback traffic pass.
`uninstall()` restores everything.

Two layers, one rule:
- Python wrappers on socket.socket (connect, connect_ex, sendto, sendmsg with an address) and on the module functions
  of `socket` and `_socket` (create_connection, getaddrinfo, gethostbyname, gethostbyname_ex, gethostbyaddr,
  getnameinfo). They refuse before the original is called.
- An audit hook (PEP 578) for the events CPython's socket module raises in C before each system call: socket.__new__,
  socket.bind, socket.connect (connect and connect_ex), socket.sendto, socket.sendmsg, socket.getaddrinfo,
  socket.gethostbyname (also gethostbyname_ex), socket.gethostbyaddr (also getfqdn) and socket.getnameinfo. It covers
  what the wrappers cannot: the methods of the C base class `_socket.socket` called directly (the type is immutable,
  and a reference to it is always reachable, e.g. through socket.socket.__mro__), functions saved before the guard
  was installed, and names resolved by connect/sendto/bind themselves. Opening a socket of any family other than
  AF_UNIX, AF_INET and AF_INET6 (AF_PACKET, AF_NETLINK, ...) or of type SOCK_RAW is refused; for connect, sendto,
  sendmsg and bind the socket's real family is read from the kernel (SO_DOMAIN), so a socket wrapped from a file
  descriptor under another family gets the same checks. An audit hook cannot be removed: after `uninstall()` it
  returns at once and changes nothing.

What stays outside: native code that calls the C library itself (C extensions, ctypes, uvloop, subprocesses), and
sends on a socket that was connected or bound before the guard was installed. `hearth serve --sandbox` (sandbox.py)
closes those with a network namespace.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# set while the guard is on: model hubs stay offline (they read these when first imported or asked to download)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
}
# set even with --allow-network: no usage statistics or telemetry, ever
NO_TELEMETRY_ENV = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "ANONYMIZED_TELEMETRY": "False",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "OTEL_SDK_DISABLED": "true",  # OpenTelemetry (FastAPI carries its API): no exporters
}
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# the only families a socket may be opened in while the guard is on; AF_INET/AF_INET6 then only to loopback
AF_UNIX = getattr(socket, "AF_UNIX", -2)  # not on every platform
ALLOWED_FAMILIES = frozenset({AF_UNIX, *INET_FAMILIES})
ALLOWED_TYPES = frozenset({socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET})
_TYPE_FLAGS = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)
# frames in these files are the plumbing, not the caller
_PLUMBING = ("socket.py", "ssl.py", "offline.py", "selector_events.py", "base_events.py", "proactor_events.py")
# module functions wrapped on both `socket` and `_socket` (socket.py's own functions call `_socket`'s)
_RESOLVER_FUNCTIONS = ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo")
_SOCKET_METHODS = ("connect", "connect_ex", "sendto", "sendmsg")


class OfflineError(ConnectionRefusedError):
    """An outbound connection refused by the offline guard (an OSError, so network code handles it as one)."""

    def __init__(self, target: str, caller: str, action: str = "a connection to") -> None:
        super().__init__(errno.ECONNREFUSED, f"offline: Hearth refused {action} {target} from {caller}; "
                                             "serve or run with --allow-network to permit it")  # fmt: skip
        self.target = target
        self.caller = caller


def is_local_host(host: Any) -> bool:
    """Loopback IP literals and localhost names; anything else (other names included) is not local."""
    if host is None:
        return True  # getaddrinfo(None, port): the local host
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    name = host.strip("[]").split("%", 1)[0].lower().rstrip(".")
    if name in LOCAL_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _is_ip_literal(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        return True
    except ValueError:
        return False


def resolves_without_a_query(host: Any) -> bool:
    """Whether the resolver answers for `host` from the host itself: localhost names and IP literals."""
    return is_local_host(host) or _is_ip_literal(host)


def caller_description() -> str:
    """`module.function (file:line)` of the first frame outside the socket machinery and this module."""
    frame = sys._getframe(1)
    while frame is not None and os.path.basename(frame.f_code.co_filename) in _PLUMBING:
        frame = frame.f_back
    if frame is None:
        return "unknown code"
    module = frame.f_globals.get("__name__", "?")
    return f"{module}.{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"address family {family}"


def _real_family(sock: Any) -> int:
    """The family the kernel says the socket has (a socket object made from a descriptor may claim another)."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    except (AttributeError, OSError):  # no SO_DOMAIN (not Linux), or a closed socket (the call itself will fail)
        return getattr(sock, "family", -1)


def _format_target(address: Any) -> str:
    if isinstance(address, tuple) and len(address) > 1:
        return f"{address[0]}:{address[1]}"
    return str(address[0] if isinstance(address, tuple) and address else address)


_in_refusal = threading.local()


@dataclass
class OfflineGuard:
    """The installed guard; `blocked` lists (target, caller) of refused attempts."""

    allow_network: bool = False
    blocked: list[tuple[str, str]] = field(default_factory=list)
    _saved_env: dict[str, str | None] = field(default_factory=dict)
    _saved: dict[tuple[Any, str], Any] = field(default_factory=dict)

    def refuse(self, target: str, action: str = "a connection to") -> OfflineError:
        caller = caller_description()
        self.blocked.append((target, caller))
        if not getattr(_in_refusal, "active", False):  # a logging handler that itself reaches out is refused quietly
            _in_refusal.active = True
            try:
                logger.warning("offline guard: refused %s %s from %s", action, target, caller)
            finally:
                _in_refusal.active = False
        return OfflineError(target, caller, action)

    def check_address(self, sock: Any, address: Any) -> None:
        """connect/sendto/sendmsg: Unix sockets pass, AF_INET/AF_INET6 only to loopback, any other family never."""
        family = _real_family(sock)
        if family == AF_UNIX:
            return
        if family not in INET_FAMILIES:
            raise self.refuse(f"{_family_name(family)} address {address!r}", "sending to")
        if not (isinstance(address, tuple) and address and is_local_host(address[0])):
            raise self.refuse(_format_target(address))

    def check_bind(self, sock: Any, address: Any) -> None:
        """bind: any IP literal (a server may listen on 0.0.0.0), but names only if the resolver needs no query."""
        family = _real_family(sock)
        if family == AF_UNIX:
            return
        if family not in INET_FAMILIES:
            raise self.refuse(f"{_family_name(family)} address {address!r}", "binding to")
        host = address[0] if isinstance(address, tuple) and address else address
        if host != "" and not resolves_without_a_query(host):
            raise self.refuse(f"{host} (name lookup)")

    def check_new_socket(self, family: int, type_: int) -> None:
        if family != -1 and family not in ALLOWED_FAMILIES:  # -1: the default (AF_INET) or read from a descriptor
            raise self.refuse(f"a {_family_name(family)} socket", "opening")
        kind = type_ & ~_TYPE_FLAGS if type_ != -1 else -1
        if kind != -1 and kind not in ALLOWED_TYPES:
            name = "SOCK_RAW" if kind == socket.SOCK_RAW else f"type {kind}"
            raise self.refuse(f"a {name} socket", "opening")

    def check_lookup(self, host: Any) -> None:
        """A forward lookup: localhost names and IP literals resolve without a query; other names would send one."""
        if not resolves_without_a_query(host):
            raise self.refuse(f"{host} (name lookup)")

    def check_reverse_lookup(self, address: Any) -> None:
        """gethostbyaddr/getnameinfo: a non-loopback address (or any name) would send a DNS query (PTR)."""
        host = address[0] if isinstance(address, tuple) and address else address
        if not is_local_host(host):
            raise self.refuse(f"{host} (name lookup)")

    def uninstall(self) -> None:
        global _guard
        with _install_lock:
            for (owner, name), original in self._saved.items():
                setattr(owner, name, original)
            for name, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            self._saved.clear()
            self._saved_env.clear()
            if _guard is self:
                _guard = None  # the audit hook stays (hooks cannot be removed) but does nothing without a guard


_install_lock = threading.Lock()
_guard: OfflineGuard | None = None
_hook_added = False


def current_guard() -> OfflineGuard | None:
    return _guard


def install_offline_guard(allow_network: bool = False) -> OfflineGuard:
    """Set the offline variables and, unless `allow_network`, refuse non-loopback sockets. Idempotent: a second call
    returns the guard already installed (uninstall it first to change `allow_network`)."""
    global _guard, _hook_added
    with _install_lock:
        if _guard is not None:
            return _guard
        guard = OfflineGuard(allow_network=allow_network)
        env = NO_TELEMETRY_ENV if allow_network else {**OFFLINE_ENV, **NO_TELEMETRY_ENV}
        for name, value in env.items():
            guard._saved_env[name] = os.environ.get(name)
            os.environ[name] = value
        if not allow_network:
            _patch(guard)
            if not _hook_added:
                sys.addaudithook(_audit_hook)
                _hook_added = True
        _guard = guard
    logger.debug("offline guard installed (network %s)", "allowed" if allow_network else "blocked")
    return guard


def _audit_hook(event: str, args: tuple) -> None:
    """Checks the socket module's C-level events (see the module docstring); every other event returns at once."""
    check = _AUDIT_CHECKS.get(event)
    if check is None:
        return
    guard = _guard
    if guard is None or guard.allow_network:
        return
    check(guard, args)


def _check_sendmsg(guard: OfflineGuard, args: tuple) -> None:
    if args[1] is not None:  # sendmsg without an address sends on a socket already connected (and checked then)
        guard.check_address(args[0], args[1])


_AUDIT_CHECKS = {
    "socket.__new__": lambda guard, args: guard.check_new_socket(args[1], args[2]),
    "socket.bind": lambda guard, args: guard.check_bind(args[0], args[1]),
    "socket.connect": lambda guard, args: guard.check_address(args[0], args[1]),  # connect and connect_ex
    "socket.sendto": lambda guard, args: guard.check_address(args[0], args[1]),
    "socket.sendmsg": _check_sendmsg,
    "socket.getaddrinfo": lambda guard, args: guard.check_lookup(args[0]),
    "socket.gethostbyname": lambda guard, args: guard.check_lookup(args[0]),  # also gethostbyname_ex
    "socket.gethostbyaddr": lambda guard, args: guard.check_reverse_lookup(args[0]),  # also getfqdn
    "socket.getnameinfo": lambda guard, args: guard.check_reverse_lookup(args[0]),
}


def _patch(guard: OfflineGuard) -> None:
    def save(owner: Any, name: str) -> Any:
        original = getattr(owner, name)
        guard._saved[(owner, name)] = original
        return original

    connect, connect_ex = save(socket.socket, "connect"), save(socket.socket, "connect_ex")
    sendto, sendmsg = save(socket.socket, "sendto"), save(socket.socket, "sendmsg")
    create_connection = save(socket, "create_connection")

    def guarded_connect(self, address):
        guard.check_address(self, address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        guard.check_address(self, address)
        return connect_ex(self, address)

    def guarded_sendto(self, data, *args):
        if args:  # sendto(data, address) or sendto(data, flags, address)
            guard.check_address(self, args[-1])
        return sendto(self, data, *args)

    def guarded_sendmsg(self, buffers, *args):
        if len(args) >= 3 and args[2] is not None:  # sendmsg(buffers, ancdata, flags, address)
            guard.check_address(self, args[2])
        return sendmsg(self, buffers, *args)

    def guarded_create_connection(address, *args, **kwargs):
        host = address[0] if isinstance(address, tuple) and address else address
        if not is_local_host(host):
            raise guard.refuse(_format_target(address))
        return create_connection(address, *args, **kwargs)

    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    socket.socket.sendto = guarded_sendto
    socket.socket.sendmsg = guarded_sendmsg
    socket.create_connection = guarded_create_connection
    checks = {"getaddrinfo": guard.check_lookup, "gethostbyname": guard.check_lookup,
              "gethostbyname_ex": guard.check_lookup, "gethostbyaddr": guard.check_reverse_lookup,
              "getnameinfo": guard.check_reverse_lookup}  # fmt: skip
    for owner in (socket, _socket):
        for name in _RESOLVER_FUNCTIONS:
            setattr(owner, name, _guarded_lookup(save(owner, name), checks[name]))


def _guarded_lookup(original: Any, check: Any) -> Any:
    def guarded(host, *args, **kwargs):
        check(host)
        return original(host, *args, **kwargs)

    guarded.__name__ = guarded.__qualname__ = f"guarded_{original.__name__}"
    return guarded
