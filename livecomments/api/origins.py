"""Which web pages may use the API from their visitors' browsers (`http.allowed_origins`).

A browser sends `Origin` with every cross-site request and every WebSocket upgrade; a page
served by another site must not be able to make its visitors comment, delete, or open a socket
here. So, for a request whose `Origin` is neither this host nor an allowed origin:

* a WebSocket upgrade is refused, 403 (browsers do not apply CORS to WebSockets: this is the
  only guard there is);
* a write (POST, DELETE, any method but GET and HEAD) is refused, 403, before its body is
  read: a cross-site form or `text/plain` POST ("simple" requests, which browsers send without
  asking first) writes nothing;
* a read is answered, without `Access-Control-Allow-Origin`: the browser keeps the answer from
  the page (and a read needs no protection from being sent);
* a CORS preflight (`OPTIONS`) is refused, 403.

An allowed origin gets `Access-Control-Allow-Origin` (its own, with `Vary: Origin`) on every
answer, and preflights answered 204. A request without `Origin` is not a browser's cross-site
request (curl, a backend) and is let through: what protects writes from those is auth, not
origins. Empty list: only pages of this host (same origin, compared with the `Host` header;
nginx must pass it on: `proxy_set_header Host $http_host`). `["*"]`: any page.
Refusals are counted as errors by code, `origin_not_allowed`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from livecomments.api.errors import ApiError, render

SAFE_METHODS = frozenset({"GET", "HEAD"})
# What a page may send beyond the CORS-safelisted headers.
ALLOW_HEADERS = "Authorization, Content-Type, Content-Encoding"
# What a page may read beyond the safelisted response headers.
EXPOSE_HEADERS = "Retry-After, WWW-Authenticate"
# Seconds a browser may cache a preflight's answer.
PREFLIGHT_MAX_AGE = "600"
_DEFAULT_PORTS = {"http": 80, "https": 443}


class OriginPolicy:
    def __init__(self, allowed_origins: list[str]) -> None:
        self.any = "*" in allowed_origins
        self.allowed = frozenset(allowed_origins)

    def allows(self, request: web.Request) -> bool:
        """Whether the request's page may use the API: no Origin, this host, or allowed."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or self.any or origin in self.allowed:
            return True
        return _same_origin(origin, request.host)

    def cross_site_allowed(self, request: web.Request) -> str | None:
        """The Origin to name in `Access-Control-Allow-Origin`, if the request is cross-site
        and allowed."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or _same_origin(origin, request.host):
            return None
        return origin if self.any or origin in self.allowed else None


def _same_origin(origin: str, host: str) -> bool:
    """`Origin` against `Host`. The scheme is not compared: behind a proxy that ends TLS this
    process sees http for https pages; a port left out is the scheme's default. An `Origin` or
    `Host` that is not a URL's origin (`http://[`, a port past 65535) is not this host."""
    try:
        url = urlsplit(origin)
        origin_port = url.port or _DEFAULT_PORTS.get(url.scheme)
        here = urlsplit("//" + host)
        # A Host without a port names the scheme's default, not whatever the Origin says: a
        # page on another port of this host is another origin.
        here_port = here.port or _DEFAULT_PORTS.get(url.scheme)
    except ValueError:
        return False
    return bool(url.hostname) and (url.hostname, origin_port) == (here.hostname, here_port)


def refused(what: str) -> ApiError:
    return ApiError(403, "origin_not_allowed", f"{what} from this Origin is not allowed")


def origin_middleware(policy: OriginPolicy) -> Middleware:
    """The policy as the outermost middleware: it refuses before anything else runs, and
    decorates every answer, errors included."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.method == hdrs.METH_OPTIONS:
                return _preflight(policy, request)
            if not policy.allows(request):
                if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
                    raise refused("a WebSocket")
                if request.method not in SAFE_METHODS:
                    raise refused(request.method)
        except ApiError as e:
            return render(e)
        response = await handler(request)
        if hdrs.ORIGIN in request.headers and not response.prepared:
            response.headers.add(hdrs.VARY, "Origin")
            allowed = policy.cross_site_allowed(request)
            if allowed is not None:
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
                response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS
        return response

    return middleware


def _preflight(policy: OriginPolicy, request: web.Request) -> web.Response:
    """`OPTIONS` on a route: 204 with the methods it takes (and the CORS answer for an allowed
    origin), 403 for another origin, 404 for no route."""
    error = request.match_info.http_exception
    if not isinstance(error, web.HTTPMethodNotAllowed):
        raise ApiError(404, "not_found", "Not Found")
    methods = ", ".join(sorted(set(error.allowed_methods) | {hdrs.METH_OPTIONS}))
    if not policy.allows(request):
        raise refused("a cross-site request")
    response = web.Response(status=204, headers={hdrs.ALLOW: methods})
    allowed = policy.cross_site_allowed(request)
    if allowed is not None:
        response.headers.update(
            {
                hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: allowed,
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: methods,
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOW_HEADERS,
                hdrs.ACCESS_CONTROL_MAX_AGE: PREFLIGHT_MAX_AGE,
                hdrs.VARY: "Origin",
            }
        )
    return response
