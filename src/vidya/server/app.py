"""The HTTP surface: FastAPI routes for the OpenAI API, health, metrics, tokenizer and version.

Every route reads the raw body and validates it itself (protocol.py), so every failure is an
OpenAI error body with a 4xx status (never FastAPI's 422). The model loads in the background:
`/health` answers 503 until the engine can serve, again while draining, and after it died.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vidya import __version__
from vidya.engine.async_llm import AsyncLLM
from vidya.server import metrics, protocol
from vidya.server.errors import APIError, bad_request
from vidya.server.serving import Job, Serving, Submitted, chat_response, completion_response, new_id
from vidya.server.streaming import chat_stream, completion_stream

log = logging.getLogger("vidya.server")
OPEN_PATHS = ("/health", "/metrics", "/version")  # never counted as in-flight work (nor are they behind the key)


@dataclass(slots=True)
class ServerSettings:
    served_model_names: list[str]
    api_keys: list[str] = field(default_factory=list)
    max_waiting: int | None = 512
    max_tokens_default: int | None = None
    allowed_origins: list[str] = field(default_factory=list)
    warm_tutor_prompts: bool = True  # compute the tutor's system prompts into the prefix cache at start-up
    max_sequences_per_request: int = 128
    max_logprob_entries: int = 1 << 18
    max_request_bytes: int = 4 << 20


@dataclass(slots=True)
class ServerState:
    llm: AsyncLLM | None = None
    serving: Serving | None = None
    draining: bool = False
    load_error: str | None = None
    in_flight: int = 0  # HTTP requests being answered, streams until their last byte
    created: int = field(default_factory=lambda: int(time.time()))

    def unavailable(self) -> str | None:
        if self.load_error or (self.llm is not None and not self.llm.is_alive):
            return "the engine has stopped"
        if self.draining:
            return "the server is shutting down"
        if self.serving is None:
            return "the model is still loading"
        return None


class InFlight:
    """ASGI middleware: counts requests until their response is fully sent (what a drain waits for)."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


async def until_disconnect(request: Request, coro):
    """Await `coro`, cancelling it (which aborts its engine requests) if the client goes away."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done():
        await asyncio.wait({task})  # (cancel() only asks: the task ends at its next await)
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening
    return task.result()


def build_app(settings: ServerSettings, state: ServerState) -> FastAPI:
    app = FastAPI(title="vidya", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    registry = metrics.make_registry(lambda: state.llm if state.serving else None, settings.served_model_names[0])
    keys = [k.encode() for k in settings.api_keys]

    def authorize(request: Request) -> None:
        if not keys:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].encode() if given[:7].lower() == "bearer " else b""
        ok = False
        for k in keys:  # every key compared, each in constant time
            ok |= hmac.compare_digest(token, k)
        if not ok:
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def serving_or_503() -> Serving:
        reason = state.unavailable()
        if reason:
            raise APIError(503, reason, code="service_unavailable", headers={"Retry-After": "5"})
        return state.serving

    async def read_body(request: Request) -> bytes:
        """The body, or a 413 as soon as it passes the limit (never buffered beyond it)."""
        limit = settings.max_request_bytes
        too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def body_of(request: Request, model):
        authorize(request)
        serving = serving_or_503()
        protocol.require_json(request.headers.get("content-type"))
        return serving, protocol.parse(model, await read_body(request))

    def admit(serving: Serving, jobs: list[Job]) -> Submitted:
        """429 past the waiting queue's cap, else the jobs go to the engine: check and submit
        with no await between them, so a burst of requests cannot all pass the check first."""
        llm = serving.llm
        if settings.max_waiting is not None and llm.num_waiting() >= settings.max_waiting:
            raise APIError(429, f"The server is busy ({llm.num_waiting()} requests waiting); retry shortly",
                           code="rate_limit_exceeded", headers={"Retry-After": "2"})
        return serving.submit(jobs)

    @app.exception_handler(APIError)
    async def on_api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_, e: RequestValidationError):
        return bad_request("invalid request").response()

    @app.exception_handler(Exception)
    async def on_unexpected(_, e: Exception):
        log.exception("unexpected error")
        return APIError(500, f"internal error: {type(e).__name__}").response()

    @app.get("/health")
    async def health():
        reason = state.unavailable()
        if reason:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(registry), media_type=metrics.CONTENT_TYPE)

    @app.get("/version")
    async def version():
        """vidya's version and what this machine runs (null while the model loads)."""
        engine = state.llm.engine if state.llm is not None else None
        return {"version": __version__, "backend": engine.platform.as_dict() if engine else None,
                "kv_cache": engine.kv_cache_info() if engine else None}

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "vidya",
                "root": state.llm.engine.args.model, "parent": None,
                "max_model_len": state.llm.engine.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        serving_or_503()
        return {"object": "list", "data": [model_card(n) for n in settings.served_model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        serving_or_503().model_name(model_id)
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        serving, req = await body_of(request, protocol.ChatCompletionRequest)
        model = serving.model_name(req.model)
        jobs = await serving.chat_jobs(req)  # a request that can never run gets its 400, not a 429
        rid = new_id("chatcmpl")
        sub = admit(serving, jobs)
        if req.stream:
            return _EventStream(chat_stream(serving, rid, model, sub, req.include_usage), sub)
        build = lambda outs: chat_response(rid, model, jobs, outs, serving.engine.token_bytes)  # noqa: E731
        return await _whole(request, serving, sub, build)

    @app.post("/v1/completions")
    async def completions(request: Request):
        serving, req = await body_of(request, protocol.CompletionRequest)
        model = serving.model_name(req.model)
        jobs = await serving.completion_jobs(req)  # a request that can never run gets its 400, not a 429
        rid = new_id("cmpl")
        sub = admit(serving, jobs)
        if req.stream:
            return _EventStream(completion_stream(serving, rid, model, sub, req.echo, req.include_usage), sub)
        return await _whole(request, serving, sub, lambda outs: completion_response(rid, model, jobs, outs, req.echo))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        serving, req = await body_of(request, protocol.TokenizeRequest)
        serving.model_name(req.model)
        engine = serving.engine
        if req.messages is not None:
            conv = protocol.ChatCompletionRequest(messages=req.messages).conversation()
            try:
                text = engine.apply_chat_template(conv, add_generation_prompt=req.add_generation_prompt)
            except ValueError as e:
                raise bad_request(str(e), param="messages") from None
            ids = engine.tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = engine.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        serving, req = await body_of(request, protocol.DetokenizeRequest)
        serving.model_name(req.model)
        vocab = serving.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise bad_request(f"tokens must be integers in [0, {vocab})", param="tokens")
        return {"prompt": serving.engine.tokenizer.decode(req.tokens)}

    from vidya.tutor.routes import add_tutor_routes
    add_tutor_routes(app, settings.served_model_names[0], lambda: state.serving and state.serving.engine)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(InFlight, state=state)
    return app


async def _whole(request: Request, serving: Serving, sub: Submitted, build):
    try:
        return await until_disconnect(request, _respond(serving, sub, build))
    finally:
        sub.close()  # a client gone before its task began leaves nothing running


async def _respond(serving: Serving, sub: Submitted, build) -> JSONResponse:
    return JSONResponse(build(await serving.final_outputs(sub)))


class _EventStream(StreamingResponse):
    """Server-Sent Events whose engine requests are aborted however the response ends, even
    when the server never started iterating the stream (the client left first)."""

    def __init__(self, stream, sub: Submitted) -> None:
        super().__init__(stream, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._sub = sub

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._sub.close()
            await self.body_iterator.aclose()  # a stream cut while it sent: end its generators now
