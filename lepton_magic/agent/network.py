"""Which network interface a rank should use to reach rank 0.

gloo (and nccl) pick an interface from the host name and, across machines, often pick one
the other side cannot reach (127.0.0.1 in the classic case). Naming the interface that routes
to MASTER_ADDR avoids it: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

try:
    import psutil
except ImportError:  # a bare host: the little the agent needs, from /proc
    from . import procfs as psutil  # type: ignore[no-redef]


#: A standby reads the interfaces while it waits (see warm_up); a job within this many seconds
#: uses what it read, later ones read them again (a VPN may have come up meanwhile).
ADDRESSES_FRESH_SECONDS = 30.0
_addresses: tuple[float, dict] | None = None


def warm_up() -> None:
    """Read the interfaces ahead of a job: the first read in a process costs about 1 ms, on the
    way of every short cell otherwise."""
    global _addresses
    _addresses = (time.monotonic(), psutil.net_if_addrs())


def refresh() -> None:
    """Read them again if what was read is half-way to stale (zygotes, before each fork: their
    standbys inherit it)."""
    if _addresses is None or time.monotonic() - _addresses[0] > ADDRESSES_FRESH_SECONDS / 2:
        warm_up()


def _net_if_addrs() -> dict:
    if _addresses is None or time.monotonic() - _addresses[0] > ADDRESSES_FRESH_SECONDS:
        warm_up()
    return _addresses[1]


def interface_for(address: str) -> str | None:
    """The interface this machine uses to reach ``address`` (the one holding it, if local)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # a name: resolve it
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(address))
        except (OSError, ValueError):
            return None
    for name, addrs in _net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and a.address == str(ip):
                return name
    return _route(ip)


def _route(ip: ipaddress.IPv4Address) -> str | None:
    """Longest-prefix match in /proc/net/route (Linux), without running `ip route get`."""
    best: tuple[int, str] | None = None
    try:
        with open("/proc/net/route") as f:
            next(f)
            for line in f:
                fields = line.split()
                iface, dest, mask = fields[0], int(fields[1], 16), int(fields[7], 16)
                dest_ip = struct.unpack("<I", struct.pack("<I", dest))[0]
                net = ipaddress.ip_address(socket.inet_ntoa(struct.pack("<I", dest_ip)))
                netmask = ipaddress.ip_address(socket.inet_ntoa(struct.pack("<I", mask)))
                if int(ip) & int(netmask) == int(net):
                    prefix = bin(int(netmask)).count("1")
                    if best is None or prefix > best[0]:
                        best = (prefix, iface)
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return best[1] if best else None


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 and ::1 (127.0.0.2 too: Ray's tests use it), and the name localhost."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def loopback_interface() -> str | None:
    for name, addresses in _net_if_addrs().items():
        if any(a.family == socket.AF_INET and is_loopback(a.address) for a in addresses):
            return name
    return None


def listen_on(host: str, port: int) -> socket.socket | None:
    """A listening TCP socket on ``host:port`` (an address of this machine), or None when
    ``host`` is not one of its addresses (behind NAT): then torch listens everywhere."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(1024)
    except OSError:
        sock.close()
        return None
    return sock


def socket_env(master_addr: str, env: dict[str, str]) -> dict[str, str]:
    """GLOO/NCCL_SOCKET_IFNAME for a rank (unless the user chose): the interface that routes to
    rank 0, the loopback one when rank 0 is on loopback (so gloo listens there only)."""
    iface = loopback_interface() if is_loopback(master_addr) else interface_for(master_addr)
    out = {}
    if iface:
        for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if key not in env:
                out[key] = iface
    return out
