"""The HTTP routes, on one `APIRouter`: each parses its request, calls its handler and sends the
body. The service is a dependency (`get_service`), taken from the state the app's lifespan yields.

/v1/score, /v1/rerank and /rerank are plain Starlette routes on the same router: the body is
validated straight from its bytes (pydantic's JSON parser), without FastAPI's per-request
dependency machinery, which cost a third of the event loop's time per pair at 32 clients. Errors
keep the same shape."""
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from . import handlers
from .errors import invalid, not_utf8
from .protocol import CompletionRequest, Health, ModelList, RerankRequest, ScoreRequest
from .service import Service

router = APIRouter()


def get_service(request: Request) -> Service:
    """The app's service: the lifespan yields it as state, which Starlette copies into every request."""
    return request.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def parse(request: Request, model: type[BaseModel]):
    """The request body validated by `model`; 422 naming the first field at fault."""
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors()
        if errors and errors[0].get("type") == "json_invalid":
            # the JSON parser says only "invalid unicode code point": say which byte, and where
            raise not_utf8(body) or invalid(errors) from None
        raise invalid(errors) from None


async def score(request: Request) -> JSONResponse:
    """POST /v1/score -> ScoreResponse."""
    return JSONResponse(await handlers.score(get_service(request), await parse(request, ScoreRequest)))


async def rerank(request: Request) -> JSONResponse:
    """POST /v1/rerank and /rerank -> RerankResponse."""
    return JSONResponse(await handlers.rerank(get_service(request), await parse(request, RerankRequest)))


router.add_route("/v1/score", score, methods=["POST"])
router.add_route("/v1/rerank", rerank, methods=["POST"])
router.add_route("/rerank", rerank, methods=["POST"])

@router.post("/v1/completions", response_class=JSONResponse)
async def completions(request: Request, svc: ServiceDep) -> JSONResponse:
    return JSONResponse(await handlers.complete(svc, await parse(request, CompletionRequest)))


@router.get("/v1/models", response_model=ModelList)
async def models(svc: ServiceDep) -> dict:
    return handlers.models(svc)


@router.get("/health", response_model=Health)
async def health(svc: ServiceDep) -> dict:
    return handlers.health(svc)


@router.get("/metrics")
async def metrics(svc: ServiceDep) -> Response:
    content, media_type = svc.metrics.exposition()
    return Response(content, media_type=media_type)
