"""Listen addresses: the ``host:port`` syntax of ``[metrics] listen`` and what counts as loopback.

Kept apart from :mod:`daemon.service.metrics` so that checking a configuration (every ``inboxd
status`` loads one) does not import the metrics library, and so that the older Marple API's target
can ask :func:`is_loopback` without depending on the metrics endpoint.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

__all__ = ["is_loopback", "parse_listen"]

_PORT: Final = re.compile(r"[0-9]{1,5}\Z")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is certainly this machine: ``localhost``, 127.0.0.0/8, ``::1`` (also
    as an IPv4-mapped address). A host name is never resolved to decide."""
    if host.lower() in ("localhost", "localhost."):
        return True  # RFC 6761: always the loopback interface, so safe without a DNS lookup
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name could resolve anywhere; never resolve it to decide
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def parse_listen(
    listen: str, *, allow_remote: bool = False, key: str = "metrics listen"
) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6addr]:port"``) into ``(host, port)``.

    The endpoint has no authentication, so unless ``allow_remote`` the host must be a loopback
    address (127.0.0.0/8, ``::1``) or ``localhost``. With ``allow_remote`` an empty host
    (``":9464"``) means every interface. Raises :class:`ValueError` with a message fit for a
    configuration error, starting with ``<key> = '<listen>':`` (the config passes its key).
    """
    text = listen.strip()
    where = f"{key} = {listen!r}"
    if text.startswith("["):
        close = text.find("]")
        if close == -1 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{where}: expected '[address]:port'")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{where}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{where}: expected 'host:port', e.g. 127.0.0.1:9464")
        if ":" in host:
            raise ValueError(f"{where}: write an IPv6 address in brackets, e.g. [::1]:9464")
    if not _PORT.match(port_text) or int(port_text) > 65535:
        raise ValueError(f"{where}: the port must be a number 0-65535")
    if not allow_remote and not is_loopback(host):
        host_shown = repr(host) if host else "every interface"
        raise ValueError(
            f"{where}: {host_shown} is not a loopback address. The metrics"
            " endpoint has no authentication, so it listens only on 127.0.0.1, [::1] or"
            " localhost unless remote access is explicitly allowed"
        )
    return host, int(port_text)
