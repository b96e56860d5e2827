"""Pure ASGI middlewares (no BaseHTTPMiddleware: they add no task or body copy per request):
request counts and latencies by endpoint, and the request-body limit."""
import json
import time

from .errors import error_body
from .metrics import ENDPOINTS, Metrics


class RequestMetrics:
    """ASGI middleware: count requests by endpoint and status, time them. Pure ASGI, not
    BaseHTTPMiddleware: it adds no task or body copy per request."""

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
        finally:
            self.count(endpoint, status, time.perf_counter() - start)


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes with 413, by its Content-Length or,
    for a chunked body, as soon as the bytes received pass the limit. In that case the app is told
    the client left (FastAPI would turn an exception raised while reading into a 400), and
    whatever it answers is dropped: the client has its 413."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def refuse(self, send):
        self.metrics.rejected.labels("body_too_large").inc()
        body = json.dumps(error_body(f"body: request body over the limit of {self.limit} bytes", "body",
                                     "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(send)
        received, refused, started = 0, False, False

        async def limited_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit and not started:
                    refused = True
                    await self.refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
