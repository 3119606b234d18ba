"""The offline guard: hub libraries told to stay offline, and non-loopback sockets refused in-process.

`install_offline_guard()` sets the offline and no-telemetry variables (HF_HUB_OFFLINE, DO_NOT_TRACK, ...) and
wraps socket.socket.connect / connect_ex / sendto, socket.create_connection and socket.getaddrinfo so that any
attempt to reach a non-loopback address raises `OfflineError` before a packet leaves, naming the code that tried
(the first stack frame outside the socket machinery) and logging a warning. Name lookups other than localhost are
refused too (they would send DNS queries). Unix sockets and loopback traffic pass. `uninstall()` restores everything.
"""

from __future__ import annotations

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
# frames in these files are the plumbing, not the caller
_PLUMBING = ("socket.py", "ssl.py", "offline.py", "selector_events.py", "base_events.py", "proactor_events.py")


class OfflineError(ConnectionRefusedError):
    """An outbound connection refused by the offline guard (an OSError, so network code handles it as one)."""

    def __init__(self, target: str, caller: str) -> None:
        super().__init__(errno.ECONNREFUSED, f"offline: Hearth refused a connection to {target} from {caller}; "
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
    try:
        ipaddress.ip_address(str(host).strip("[]").split("%", 1)[0])
        return True
    except ValueError:
        return False


def caller_description() -> str:
    """`module.function (file:line)` of the first frame outside the socket machinery and this module."""
    frame = sys._getframe(1)
    while frame is not None and os.path.basename(frame.f_code.co_filename) in _PLUMBING:
        frame = frame.f_back
    if frame is None:
        return "unknown code"
    module = frame.f_globals.get("__name__", "?")
    return f"{module}.{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"


@dataclass
class OfflineGuard:
    """The installed guard; `blocked` lists (target, caller) of refused attempts."""

    allow_network: bool = False
    blocked: list[tuple[str, str]] = field(default_factory=list)
    _saved_env: dict[str, str | None] = field(default_factory=dict)
    _saved: dict[str, Any] = field(default_factory=dict)

    def refuse(self, target: str) -> OfflineError:
        caller = caller_description()
        self.blocked.append((target, caller))
        logger.warning("offline guard: refused a connection to %s from %s", target, caller)
        return OfflineError(target, caller)

    def check_address(self, sock: socket.socket, address: Any) -> None:
        if sock.family not in INET_FAMILIES or not isinstance(address, tuple) or not address:
            return
        if not is_local_host(address[0]):
            raise self.refuse(f"{address[0]}:{address[1]}" if len(address) > 1 else str(address[0]))

    def uninstall(self) -> None:
        global _guard
        with _install_lock:
            for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket.socket, "sendto"),
                                (socket, "create_connection"), (socket, "getaddrinfo")):  # fmt: skip
                original = self._saved.get(name)
                if original is not None:
                    setattr(owner, name, original)
            for name, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            self._saved.clear()
            self._saved_env.clear()
            if _guard is self:
                _guard = None


_install_lock = threading.Lock()
_guard: OfflineGuard | None = None


def current_guard() -> OfflineGuard | None:
    return _guard


def install_offline_guard(allow_network: bool = False) -> OfflineGuard:
    """Set the offline variables and, unless `allow_network`, refuse non-loopback sockets. Idempotent: a second call
    returns the guard already installed (uninstall it first to change `allow_network`)."""
    global _guard
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
        _guard = guard
    logger.debug("offline guard installed (network %s)", "allowed" if allow_network else "blocked")
    return guard


def _patch(guard: OfflineGuard) -> None:
    connect, connect_ex, sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto
    create_connection, getaddrinfo = socket.create_connection, socket.getaddrinfo
    guard._saved.update(connect=connect, connect_ex=connect_ex, sendto=sendto, create_connection=create_connection,
                        getaddrinfo=getaddrinfo)  # fmt: skip

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

    def guarded_create_connection(address, *args, **kwargs):
        host = address[0] if isinstance(address, tuple) and address else address
        if not is_local_host(host):
            raise guard.refuse(f"{host}:{address[1]}" if isinstance(address, tuple) and len(address) > 1 else host)
        return create_connection(address, *args, **kwargs)

    def guarded_getaddrinfo(host, *args, **kwargs):
        # IP literals resolve without a packet (binding to one must work); names other than localhost need DNS
        if not is_local_host(host) and not _is_ip_literal(host):
            raise guard.refuse(f"{host} (name lookup)")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    socket.socket.sendto = guarded_sendto
    socket.create_connection = guarded_create_connection
    socket.getaddrinfo = guarded_getaddrinfo
