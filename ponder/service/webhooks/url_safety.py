"""Where webhook deliveries may go: the URL rules and the address checks (at submit time and again
when connecting) that keep deliveries off private networks and cloud metadata services (SSRF)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

MAX_URL_LENGTH = 2048

# Cloud instance metadata services: refused even where private addresses are allowed.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)

# IPv6 prefixes that carry an IPv4 address in their last 32 bits and are routed to it: a translator
# (NAT64, RFC 6052's well-known prefix) or the deprecated IPv4-compatible form (RFC 4291 2.5.5.1).
# 6to4 (2002::/16) and Teredo (2001::/32) carry theirs elsewhere (ipaddress decodes both).
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# A network's own translator (RFC 8215): where it leads depends on that network, never global.
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class UnsafeWebhookUrl(ValueError):
    """A webhook URL Ponder will not call: wrong scheme, or an address it must not reach."""


def check_url_syntax(url: str, require_https: bool) -> tuple[str, str, int]:
    """(scheme, host, port) of an acceptable webhook URL, else UnsafeWebhookUrl."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeWebhookUrl(f"longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UnsafeWebhookUrl(f"not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeWebhookUrl("only http and https URLs can receive webhooks")
    if require_https and scheme != "https":
        raise UnsafeWebhookUrl("must be https")
    if not parts.hostname:
        raise UnsafeWebhookUrl("has no host")
    try:
        parts.hostname.encode("idna")
    except UnicodeError:  # an empty label (a..b) or one over 63 characters
        raise UnsafeWebhookUrl(f"{parts.hostname!r} is not a valid host name") from None
    if parts.username is not None or parts.password is not None:
        raise UnsafeWebhookUrl("must not carry credentials (user:password@)")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80)


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: ::ffff:a.b.c.d (mapped), NAT64, IPv4-compatible,
    6to4 and Teredo (its server and its client). `is_global` judges the IPv6 prefix, not them."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):  # not :: or ::1
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address.sixtofour]
    return list(address.teredo or ())


def address_refusal(address: IPAddress, allow_private: bool) -> str | None:
    """Why Ponder must not connect to this address, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in LOCAL_NAT64 and not allow_private:
            return f"{address} is a local-use NAT64 address (PONDER_WEBHOOK_ALLOW_PRIVATE is off)"
        for inner in embedded_ipv4(address):
            refusal = address_refusal(inner, allow_private)
            if refusal:
                return refusal if inner == address.ipv4_mapped else f"{address} leads to {inner}: {refusal}"
    if address in METADATA_ADDRESSES:
        return f"{address} is a cloud metadata address"
    if address.is_unspecified or address.is_multicast:
        return f"{address} is not a unicast address"
    if address.is_global or allow_private:
        return None
    # is_global is False for loopback, private, link-local, shared (CGNAT), reserved and documentation ranges
    kind = "loopback" if address.is_loopback else "link-local" if address.is_link_local else "private or reserved"
    return f"{address} is a {kind} address (PONDER_WEBHOOK_ALLOW_PRIVATE is off)"


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # sockaddr[0] is the address text for AF_INET/AF_INET6 (an int only in the (int, bytes) form a
    # Python built without IPv6 gives an IPv6 answer): str() changes nothing for the real cases
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def safe_addresses(host: str, port: int, allow_private: bool, resolver: Resolver = system_resolver) -> list[IPAddress]:
    """Resolve `host` and check every address it has (one bad record refuses the host: a client
    could otherwise steer the connection to it). Raises UnsafeWebhookUrl; OSError when it does
    not resolve."""
    try:
        addresses, prefix = [ipaddress.ip_address(host.strip("[]"))], ""
    except ValueError:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(host, port)]
        prefix = f"{host} resolves to "
        if not addresses:
            raise OSError(f"{host} has no addresses") from None
    for address in addresses:
        refusal = address_refusal(address, allow_private)
        if refusal:
            raise UnsafeWebhookUrl(prefix + refusal)
    return addresses


def check_url(url: str, allow_private: bool, require_https: bool, resolver: Resolver = system_resolver) -> None:
    """Submit-time check: the URL's form, then the addresses its host resolves to now. Delivery
    checks again when it connects (DNS answers change: see pin_url)."""
    _, host, port = check_url_syntax(url, require_https)
    try:
        safe_addresses(host, port, allow_private, resolver)
    except OSError as e:
        raise UnsafeWebhookUrl(f"the host {host} does not resolve ({e})") from None


@dataclass(frozen=True)
class PinnedUrl:
    """Where to connect: the URL with its host replaced by an address that passed the check, and
    the name the server expects (Host header; SNI and certificate check for https)."""

    url: str
    host_header: str
    sni_hostname: str | None


def pin_url(url: str, allow_private: bool, require_https: bool, resolver: Resolver = system_resolver) -> PinnedUrl:
    """Delivery-time check: resolve once, check every address, and connect to the checked one, so
    a DNS answer that changes between the check and the connection (rebinding) cannot redirect
    it. Raises UnsafeWebhookUrl (never retried), or OSError when the host does not resolve."""
    scheme, host, port = check_url_syntax(url, require_https)
    address = safe_addresses(host, port, allow_private, resolver)[0]
    parts = urlsplit(url)
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = literal + (f":{parts.port}" if parts.port is not None else "")
    pinned = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    sni = host if scheme == "https" and not _is_ip(host) else None  # an IP literal sends no SNI
    return PinnedUrl(pinned, parts.netloc, sni)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False
