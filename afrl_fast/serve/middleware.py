"""Pure ASGI middlewares (no BaseHTTPMiddleware: they add no task or body copy per request), from
the outside in: request counts and latencies by endpoint, the API key, and the request body's
size and time limits."""
import asyncio
import hmac
import json
import logging
import time

from .errors import error_body
from .metrics import ENDPOINTS, Metrics

log = logging.getLogger("afrl_fast.serve")


async def refuse(send, status: int, message: str, param: str | None, code: str, headers=()) -> None:
    """Answer `status` with the JSON error body and close the connection (the request's body may
    not have been read: the connection cannot carry another request)."""
    body = json.dumps(error_body(message, param, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


if hasattr(asyncio, "timeout_at"):      # Python >= 3.11: a timer on this task (the hot path)
    async def receive_by(receive, deadline: float):
        async with asyncio.timeout_at(deadline):
            return await receive()
else:                                   # Python 3.10: wait_for, which runs receive() as a task of its own
    async def receive_by(receive, deadline: float):
        return await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())


class RequestMetrics:
    """Count requests by endpoint and status, time them. A request still running when the
    graceful shutdown's time is up is cancelled by uvicorn: that is logged in one line here,
    at the application's edge, instead of as a CancelledError traceback."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.counters, self.timers = {}, {}        # the labelled children, looked up once

    def count(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        counter = self.counters.get(key)
        if counter is None:
            counter = self.counters[key] = self.metrics.requests.labels(endpoint, str(status))
        timer = self.timers.get(endpoint)
        if timer is None:
            timer = self.timers[endpoint] = self.metrics.latency.labels(endpoint)
        counter.inc()
        timer.observe(seconds)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500
        start = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            # the task ends here either way; nothing waits on its result
            log.warning("%s %s cancelled: still running when --graceful-timeout ran out", scope["method"],
                        scope["path"])
        finally:
            self.count(endpoint, status, time.perf_counter() - start)


class ApiKey:
    """401 for a request without `Authorization: Bearer <key>` (vLLM's --api-key behaviour), on
    every path but /health, which load balancers and orchestrators probe without credentials and
    which tells nothing but the model's name and limits. The key is compared in constant time."""
    OPEN = ("/health",)

    def __init__(self, app, key: str, metrics: Metrics):
        self.app, self.key, self.metrics = app, key.encode(), metrics

    def authorized(self, scope) -> bool:
        header = next((value for name, value in scope.get("headers") or () if name == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest in any case, so a wrong scheme takes as long as a wrong key
        return hmac.compare_digest(token.strip(), self.key) & (scheme.lower() == b"bearer")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN or self.authorized(scope):
            return await self.app(scope, receive, send)
        self.metrics.rejected.labels("unauthorized").inc()
        await refuse(send, 401, "authorization: missing or wrong API key (send the header "
                                "'Authorization: Bearer <key>')", "authorization", "invalid_api_key",
                     [(b"www-authenticate", b"Bearer")])


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413, by its Content-Length or, for a chunked
    body, as soon as the bytes received pass the limit; and one that has not arrived whole within
    `timeout` seconds of the request's start with 408 (a slow or stalled client would otherwise
    hold its connection, and a graceful shutdown, open for as long as it likes). In both cases the
    app is told the client left (FastAPI would turn an exception raised while reading into a 400),
    and whatever it answers is dropped: the client has its 4xx."""

    def __init__(self, app, limit: int, metrics: Metrics, timeout: float = 30.0):
        self.app, self.limit, self.metrics, self.timeout = app, limit, metrics, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            self.metrics.rejected.labels("body_too_large").inc()
            return await refuse(send, 413, f"body: request body over the limit of {self.limit} bytes", "body",
                                "body_too_large")
        received, refused, started, complete = 0, False, False, False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def limited_receive():
            nonlocal received, refused, complete
            if refused:
                return {"type": "http.disconnect"}
            if complete:        # after the body, receive() only waits for a disconnect: no deadline
                return await receive()
            try:
                message = await receive_by(receive, deadline)
            except asyncio.TimeoutError:
                refused = True
                self.metrics.rejected.labels("body_timeout").inc()
                await refuse(send, 408, f"body: not received in full within {self.timeout:g} s (--body-timeout)",
                             "body", "body_timeout")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.limit and not started:
                    refused = True
                    self.metrics.rejected.labels("body_too_large").inc()
                    await refuse(send, 413, f"body: request body over the limit of {self.limit} bytes", "body",
                                 "body_too_large")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
