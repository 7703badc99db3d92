"""The FastAPI application: routes, error handlers (every error in the OpenAI shape) and guards."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from meswitch.server import protocol as P
from meswitch.server.config import ServerConfig
from meswitch.server.metrics import CONTENT_TYPE
from meswitch.server.middleware import GuardMiddleware
from meswitch.server.serving import APIError, OpenAIServing

log = logging.getLogger(__name__)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": P.ErrorResponse, "description": desc}
    for code, desc in [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                       (408, "body too slow"), (413, "body too large"), (429, "overloaded")]
}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages.0.role"``, without pydantic's union-branch tags."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and (
        p in _TYPE_TAGS or "[" in p or p.startswith("function-")))]
    return ".".join(parts) or None


def _is_type_error(kind: str) -> bool:
    return kind.endswith(("_type", "_parsing")) or kind in {"is_instance_of", "model_attributes_type"}


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first: Mapping[str, Any] = errors[0] if errors else {}
    kinds = [str(e.get("type", "")) for e in errors]
    if "json_invalid" in kinds:
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    msg = "; ".join(f"{_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:5])
    code = ("missing_required_parameter" if "missing" in kinds
            else "invalid_type" if all(_is_type_error(k) for k in kinds) else "invalid_value")
    return APIError(400, msg, param=param, code=code)


def build_app(serving: OpenAIServing, config: ServerConfig,
              lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None) -> FastAPI:
    """Routes over ``serving``, guarded by ``config``'s API key and body limits."""
    app = FastAPI(title="meswitch", version="1", lifespan=lifespan,
                  description="OpenAI-compatible server over many compressed experts of one base model.")
    metrics = serving.metrics
    engine = serving.engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI raises a bare 400 for a body it cannot decode at all (e.g. bytes that are not UTF-8)
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """200 while the engine takes requests."""
        if not engine.alive:
            raise APIError(503, "the engine is not running", "server_error", code="unavailable")
        return {"status": "ok", "experts": serving.experts, "routing": serving.routed, "pending": engine.pending}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        try:
            stats = await asyncio.wait_for(asyncio.wrap_future(engine.stats()), 10)
        except Exception:  # noqa: BLE001 - metrics still render without the engine's part
            stats = None
        return PlainTextResponse(metrics.render(stats, engine.pending), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=P.ModelList, responses=_ERRORS)
    async def models() -> P.ModelList:
        return serving.models()

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=_ERRORS)
    async def chat(body: P.ChatCompletionRequest, request: Request) -> Any:
        return await serving.chat(body, request)

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=_ERRORS)
    async def completions(body: P.CompletionRequest, request: Request) -> Any:
        return await serving.completion(body, request)

    # Outermost: runs before routing and before any body is read.
    paths = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       body_timeout_s=config.body_timeout_s,
                       on_response=lambda path, status: metrics.http_response(path if path in paths else "other",
                                                                              status))
    return app


