"""Where a webhook may go, and its delivery to exactly the address that was checked.

A webhook URL is the tenant's, and the worker POSTs to it from inside the deployment: without a check, a tenant
could make it call the cloud metadata service or an internal API. Private, loopback, link-local and other
non-global addresses are refused unless the operator allows them (`MERGEFORGE_WEBHOOK_ALLOW_PRIVATE`, on by
default only for the loopback-only embedded service). The host is resolved at submit and again at delivery, and
the delivery connects to the address that passed, so a DNS answer that changes in between (rebinding) cannot
redirect it; redirects are not followed."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

TIMEOUT_S = 10


class WebhookRefused(Exception):
    """The webhook's host is not one this service may call."""


def resolve(url: str, allow_private: bool) -> str:
    """The address to deliver `url` to: its host's first address, once every address it has is allowed. A name
    that does not resolve raises OSError (DNS may be down for a moment: a delivery retries it)."""
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except UnicodeError as exc:
        raise WebhookRefused(f"{host!r} is not a valid host name ({exc})") from None
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for address in addresses:
            if not ipaddress.ip_address(address.split("%")[0]).is_global:
                raise WebhookRefused(f"{host!r} resolves to {address}, a private or reserved address; this "
                                     "service does not call those (MERGEFORGE_WEBHOOK_ALLOW_PRIVATE)")
    return addresses[0]


def check_target(url: str, allow_private: bool) -> None:
    """At submit: refuse what resolves to a forbidden address now; a host that does not resolve yet may later."""
    with contextlib.suppress(OSError):
        resolve(url, allow_private)


def post(url: str, body: bytes, headers: dict[str, str], allow_private: bool) -> int:
    """POST to the checked address of `url` (TLS still verifies the URL's host name); returns the HTTP status."""
    parts = urlsplit(url)
    address = resolve(url, allow_private)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    connection = (_PinnedHTTPS(parts.hostname, port, address) if https
                  else _PinnedHTTP(parts.hostname, port, address))
    try:
        path = parts.path or "/"
        connection.request("POST", f"{path}?{parts.query}" if parts.query else path, body=body, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str):
        super().__init__(host, port, timeout=TIMEOUT_S)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str):
        super().__init__(host, port, timeout=TIMEOUT_S, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
