"""Fetching an image from a URL without becoming a proxy into the server's own network (SSRF).

Every address the host resolves to must be a public one; the connection then goes to that checked address
(so a second DNS answer cannot swap in another, "DNS rebinding"), redirects are not followed, proxies from
the environment are ignored, and the download is capped in bytes and in time (one deadline for the whole fetch).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Callable
from urllib.parse import urlsplit

from .limits import ServeError

__all__ = ["address_refusal", "check_address", "resolve_public", "fetch_url"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


def address_refusal(address: str | IPAddress) -> str | None:
    """Why a URL fetch may not connect to `address`, or None when it is a public unicast address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4 inside IPv6 (::ffff:a.b.c.d, 6to4, Teredo) reaches the embedded IPv4 host: judge that one
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            reason = address_refusal(embedded)
            return None if reason is None else f"{reason} (inside {ip})"
    checks = (("a loopback", ip.is_loopback), ("an unspecified", ip.is_unspecified), ("a link-local", ip.is_link_local),
              ("a multicast", ip.is_multicast), ("a private", ip.is_private), ("a reserved", ip.is_reserved),
              ("a non-public", not ip.is_global))  # fmt: skip
    return next((f"{ip} is {kind} address" for kind, hit in checks if hit), None)


def check_address(address: str | IPAddress) -> None:
    """Raise `ServeError(400)` unless `address` is a public unicast address."""
    reason = address_refusal(address)
    if reason is not None:
        raise ServeError(400, f"refused to fetch: {reason}")


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def resolve_public(host: str, port: int, resolver: Resolver = _getaddrinfo) -> list[str]:
    """Every address `host` resolves to, all checked public; `ServeError(400)` if any is not, or none exist."""
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError) as e:
        raise ServeError(400, f"cannot resolve host {host!r}: {e}") from e
    if not addresses:
        raise ServeError(400, f"host {host!r} has no addresses")
    for address in addresses:  # one private answer among public ones is refused too: the client may pick it
        check_address(address.split("%", 1)[0])
    return addresses


def _split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path?query) of an http(s) URL, or `ServeError(400)`."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ServeError(400, f"invalid URL {url[:200]!r}: {e}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServeError(400, f"invalid URL {url[:200]!r}: expected http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise ServeError(400, "URLs with credentials are not fetched")
    port = port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port, target


async def fetch_url(url: str, *, max_bytes: int, timeout_s: float, resolver: Resolver = _getaddrinfo) -> bytes:
    """The body of `url` (at most `max_bytes`), fetched from a checked public address, all within `timeout_s`.

    The deadline covers the whole fetch: resolving, connecting, the headers and the body. (httpx's own timeouts
    bound each read, so a server trickling a few bytes at a time would otherwise hold the request, and its
    model slot, for as long as it liked.)

    Raises:
        ServeError: 400 for a refused or unreachable URL or an HTTP error status, 413 for a body over the cap,
            504 when the deadline passes.
    """
    scheme, host, port, target = _split_url(url)
    try:
        async with asyncio.timeout(timeout_s):
            # a resolver stuck past the deadline is left to finish in its thread; the request does not wait
            address = (await asyncio.to_thread(resolve_public, host, port, resolver))[0].split("%", 1)[0]
            return await _fetch(url, scheme, host, port, target, address, max_bytes, timeout_s)
    except TimeoutError as e:
        raise ServeError(504, f"fetching {url[:200]} took longer than the limit of {timeout_s:g} s") from e


async def _fetch(url: str, scheme: str, host: str, port: int, target: str, address: str, max_bytes: int,
                 timeout_s: float) -> bytes:  # fmt: skip
    import httpx

    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    default_port = port == (443 if scheme == "https" else 80)
    host_header = f"[{host}]" if ":" in host else host
    headers = {"Host": host_header if default_port else f"{host_header}:{port}", "Accept": "image/*"}
    extensions = {"sni_hostname": host} if scheme == "https" else {}  # the certificate is checked for `host`
    try:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout_s) as client:
            request = client.build_request("GET", f"{scheme}://{netloc}{target}", headers=headers,
                                           extensions=extensions)  # fmt: skip
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    raise ServeError(400, f"{url[:200]} redirects (HTTP {response.status_code}); redirects are "
                                          "not followed: give the final URL")  # fmt: skip
                if response.status_code != 200:
                    raise ServeError(400, f"fetching {url[:200]} gave HTTP {response.status_code}")
                return await _read_capped(response, url, max_bytes)
            finally:
                await response.aclose()
    except httpx.TimeoutException as e:
        raise ServeError(504, f"fetching {url[:200]} took longer than the limit of {timeout_s:g} s") from e
    except httpx.HTTPError as e:
        raise ServeError(400, f"cannot fetch {url[:200]}: {type(e).__name__}: {e}") from e


async def _read_capped(response, url: str, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ServeError(413, f"{url[:200]} is {declared} bytes, more than the limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():  # each chunk as it arrives: the cap is checked as it grows
        size += len(chunk)
        if size > max_bytes:
            raise ServeError(413, f"{url[:200]} is more than the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
