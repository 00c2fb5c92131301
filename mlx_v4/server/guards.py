"""What the server checks before it parses a request: who may ask (Host and Origin on an
unkeyed server), what it sends (``application/json``), how much (a byte cap that holds for
chunked bodies too) and how deep its JSON nests.

An unkeyed server answers only requests addressed to a loopback name: a web page the user
visits cannot reach it through DNS rebinding (its requests carry the attacker's host name) nor
post to it across origins (browsers send ``Origin``; a form or ``fetch`` without CORS cannot
set ``Content-Type: application/json``). Each check raises :class:`ApiError` (4xx).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .protocols import ApiError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
MAX_JSON_DEPTH = 64  # real requests (tool schemas included) nest a dozen levels at most


def host_name(value: str) -> str:
    """The host of a Host header or netloc, port dropped and IPv6 kept in brackets:
    'LocalHost:8000' -> 'localhost', '[::1]:80' -> '[::1]'."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[:end + 1] if end > 0 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def normalize_hosts(hosts) -> frozenset[str]:
    """Allowed host names as a user gives them ('::1', '[::1]', 'Box.local:8000', '*')."""
    out = set()
    for h in hosts or ():
        h = h.strip().lower()
        if h:
            out.add(f"[{h}]" if h.count(":") > 1 and not h.startswith("[") else host_name(h))
    return frozenset(out)


def check_origin(headers, allowed: frozenset[str]) -> None:
    """On an unkeyed server: the Host header must name this machine's loopback (or an allowed
    host), and an ``Origin`` header, when sent, must too. 403 otherwise."""
    if "*" in allowed:
        return
    ok = set(LOOPBACK_HOSTS) | allowed
    host = host_name(headers.get("host") or "")
    if host not in ok:
        raise ApiError(403, f"host {host or '(none)'!r} is not allowed; this server answers "
                            f"{', '.join(sorted(ok))} (widen with --allowed-hosts, or set --api-key)")
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or host_name(parts.netloc) not in ok:
            raise ApiError(403, f"cross-origin requests from {origin[:100]!r} are not allowed")


def check_json_content_type(headers) -> None:
    """Only ``application/json`` (parameters such as charset allowed). 415 otherwise."""
    ct = headers.get("content-type") or ""
    if ct.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, not {ct[:100]!r}" if ct
                       else "Content-Type must be application/json")


async def read_body(request, limit: int) -> bytes:
    """The request body, read as a stream and refused (413) as soon as it passes ``limit``
    bytes, whether or not a Content-Length was sent."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(400, "bad content-length header") from None
        if declared > limit:
            raise ApiError(413, f"request body too large ({declared} bytes; the limit is {limit})")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body too large (over the limit of {limit} bytes)")
        parts.append(chunk)
    return b"".join(parts)


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH, step: int = 1 << 20) -> bool:
    """Whether ``body``'s arrays and objects nest deeper than ``limit`` (brackets inside
    strings do not count). A body with at most ``limit`` opening brackets costs two counts;
    others are scanned vectorized in ``step``-byte chunks, looking only at quotes and brackets."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    import numpy as np

    # inside JSON strings a backslash always starts a two-byte escape: blank escaped
    # backslashes first, then escaped quotes; every '"' left opens or closes a string
    body = body.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    delta = np.zeros(256, np.int64)
    delta[ord("[")] = delta[ord("{")] = 1
    delta[ord("]")] = delta[ord("}")] = -1
    structural = np.zeros(256, bool)
    structural[[ord(c) for c in '"[]{}']] = True
    data = np.frombuffer(body, np.uint8)
    depth, quotes = 0, 0  # carried across chunks
    for start in range(0, len(data), step):
        chunk = data[start:start + step]
        marks = chunk[structural[chunk]]  # quotes and brackets, in order
        if not len(marks):
            continue
        seen = quotes + np.cumsum(marks == ord('"'), dtype=np.int64)  # odd: inside a string
        level = depth + np.cumsum(np.where((seen & 1) == 1, 0, delta[marks]))
        if level.max() > limit:
            return True
        depth, quotes = int(level[-1]), int(seen[-1])
    return False
