"""The app factory: the FastAPI app of one service, its lifespan, error handlers and middlewares."""
import contextlib
import inspect
import logging
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..prompt_encoding import PromptEncoder
from .config import ServeConfig
from .errors import ApiError, error_body, invalid
from .middleware import ApiKey, BodyLimit, RequestMetrics
from .routes import router
from .service import Service

log = logging.getLogger("afrl_fast.serve")


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = invalid(exc.errors())
    return JSONResponse(error.body(), status_code=error.status)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(f"{request.url.path}: {exc.detail}", None, str(exc.status_code)),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
    # The client left, or BodyLimit already answered it (413, 408) and told the app it left:
    # nobody reads this answer, and it is no internal error.
    return Response(status_code=400)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", None, "internal_error",
                                   "server_error"), status_code=500)


ERROR_HANDLERS = {ApiError: api_error, RequestValidationError: invalid_request, ClientDisconnect: client_gone,
                  StarletteHTTPException: http_error, Exception: internal_error}


def fastapi_options() -> dict:
    """FastAPI >= 0.160 traces every request with OpenTelemetry unless told not to, looking up the
    global tracer, meter and logger providers per request even when none is configured. This
    service has its own Prometheus metrics; that per-request work is turned off where the option
    exists."""
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
    return {}


def create_app(backend, cfg: ServeConfig, encoder: PromptEncoder, worker: ThreadPoolExecutor) -> FastAPI:
    """The FastAPI app serving `backend`. `worker` is the single thread all inference runs in."""
    cfg.check()
    svc = Service(backend, cfg, encoder, worker)
    svc.check_room()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.start()
        try:
            # lifespan state: Starlette hands a copy to every request (routes.get_service)
            yield {"service": svc}
        finally:
            # uvicorn gets here after the requests in flight have been answered
            await svc.stop()

    app = FastAPI(title="afrl-fast scoring service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  exception_handlers=ERROR_HANDLERS, **fastapi_options())
    app.include_router(router)
    # the last added runs first: metrics see every answer, the key is checked before a body is read
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes, metrics=svc.metrics, timeout=cfg.body_timeout_s)
    if cfg.api_key:
        app.add_middleware(ApiKey, key=cfg.api_key, metrics=svc.metrics)
    app.add_middleware(RequestMetrics, metrics=svc.metrics)
    return app
