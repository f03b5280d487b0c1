"""The OpenAI-compatible policy server over the in-process engine (Starlette routes).

    routes = policy_routes(engine, ServerConfig(model_name="policy"))
    app = Starlette(routes=routes + dashboard_routes(...))      # one app, one event loop

Every generation returns the token ids it sampled and their logprobs at the sampling
temperature, in both forms NeMo Gym reads: on the message (`prompt_token_ids`,
`generation_token_ids`, `generation_log_probs`) and vLLM-style (top-level `prompt_token_ids`,
`choices[0].token_ids`, logprobs whose token reads `token_id:<id>`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from .chat import ChatRenderer
from .engine import Engine, EngineAsleep, Generation, InvalidRequest, SamplingOptions
from .onpolicy import ContiguityError
from .protocol import (
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, Choice, ChoiceLogprobs,
    DeltaMessage, ErrorBody, ErrorResponse, ModelCard, ModelList, ResponseMessage, StreamChoice,
    TokenizeRequest, TokenizeResponse, TokenLogprob, Usage,
)

log = logging.getLogger("engine.server")


@dataclass
class SamplingPin:
    """The temperature the trainer's logprobs assume, declared by the loop while it collects rollouts.

    A request sampled at any other temperature would train on ratios between two different
    distributions without any error: while a phase is declared such requests are refused.
    """

    temperature: float | None = None   # None: no collection phase, any temperature is served


@dataclass
class ServerConfig:
    model_name: str = "policy"
    api_key: str | None = None
    # Training needs logprobs of the plain temperature-scaled distribution: refuse top-k/top-p/min-p.
    strict_sampling: bool = True
    default_temperature: float = 1.0
    default_max_tokens: int = 512
    tool_parser: str | None = "hermes"
    pin: SamplingPin = field(default_factory=SamplingPin)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> Response:
        body = ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))
        # ASCII-escaped: a message may quote the request's own text, lone surrogates included
        return Response(json.dumps(body.model_dump(), ensure_ascii=True), status_code=self.status,
                        media_type="application/json")


class PolicyServer:
    """Request handling; one instance per engine."""

    def __init__(self, engine: Engine, cfg: ServerConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self.renderer = ChatRenderer(engine.tokenizer, cfg.tool_parser)

    # ---- helpers --------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.cfg.api_key and request.headers.get("authorization") != f"Bearer {self.cfg.api_key}":
            raise APIError(401, "invalid or missing API key", type_="authentication_error", code="invalid_api_key")

    async def _body(self, request: Request, model: type) -> Any:
        try:
            raw = json.loads(await request.body(), parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "request body is nested too deeply") from None
        if not isinstance(raw, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            return model.model_validate(raw)
        except RecursionError:
            raise APIError(400, "request body is nested too deeply") from None
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise APIError(400, f"{param}: {err['msg']}", param=param) from None

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.cfg.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.cfg.model_name}`",
                           param="model", code="model_not_found")

    def _check_sampling(self, req: ChatCompletionRequest) -> None:
        if not self.cfg.strict_sampling:
            return
        if req.top_k not in (None, 0, -1):
            raise APIError(400, "top_k must be off (-1) while training: it changes the sampled distribution", "top_k")
        if req.top_p not in (None, 1, 1.0):
            raise APIError(400, "top_p must be 1 while training: it changes the sampled distribution", "top_p")
        if req.min_p not in (None, 0, 0.0):
            raise APIError(400, "min_p must be 0 while training: it changes the sampled distribution", "min_p")

    def _check_token_ids(self, req: ChatCompletionRequest) -> None:
        # vLLM would refuse them deep inside the engine; name the field instead
        top = self.engine.max_token_id
        fields = [("required_prefix_token_ids", req.required_prefix_token_ids)]
        for i, m in enumerate(req.messages):
            fields += [(f"messages.{i}.prompt_token_ids", m.prompt_token_ids),
                       (f"messages.{i}.generation_token_ids", m.generation_token_ids)]
        for name, ids in fields:
            bad = next((t for t in ids or () if not 0 <= t <= top), None)
            if bad is not None:
                raise APIError(400, f"{name}: token id {bad} is outside the vocabulary [0, {top}]", name)

    def _prompt(self, req: ChatCompletionRequest) -> list[int]:
        self._check_token_ids(req)
        try:
            ids = self.renderer.prompt_ids(req.messages, req.tools, req.chat_template_kwargs,
                                           req.required_prefix_token_ids)
        except (ContiguityError, ValueError) as e:
            raise APIError(400, f"cannot build the prompt: {e}", "messages") from None
        except Exception as e:  # template errors (jinja) are the request's fault
            raise APIError(400, f"chat template failed on these messages: {e}", "messages") from None
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            # Gym's vllm_model turns a 400 mentioning "context length" into an empty, truncated turn.
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your request "
                                f"has {len(ids)} input tokens. Please reduce the length of the messages.",
                           "messages", code="context_length_exceeded")
        return ids

    def _options(self, req: ChatCompletionRequest, prompt_len: int) -> SamplingOptions:
        temperature = self.cfg.default_temperature if req.temperature is None else req.temperature
        pinned = self.cfg.pin.temperature
        if pinned is not None and temperature != pinned:
            raise APIError(400, f"temperature {temperature} differs from the temperature {pinned} that training "
                                "rollouts are sampled and trained at", "temperature")
        wanted = req.max_completion_tokens or req.max_tokens or self.cfg.default_max_tokens
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingOptions(
            temperature=temperature,
            max_tokens=min(wanted, self.engine.max_model_len - prompt_len),
            seed=req.seed,
            stop=stop,
            stop_token_ids=[self.renderer.end_of_turn_id],
        )

    # ---- endpoints ------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        self._auth(request)
        req: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        self._check_model(req.model)
        self._check_sampling(req)
        prompt_ids = self._prompt(req)
        opts = self._options(req, len(prompt_ids))
        self.engine.sampling_params(opts)  # refused parameters are a 400, also before a stream starts
        if req.stream:
            return StreamingResponse(self._stream(req, prompt_ids, opts), media_type="text/event-stream")
        gen = await self.engine.generate(prompt_ids, opts)
        return JSONResponse(self._response(req, gen).model_dump(exclude_none=True))

    def _token_logprobs(self, ids: list[int], lps: list[float], as_ids: bool) -> list[TokenLogprob]:
        out = []
        for tid, lp in zip(ids, lps):
            piece = f"token_id:{tid}" if as_ids else self.engine.tokenizer.decode([tid])
            out.append(TokenLogprob(token=piece, logprob=lp, bytes=list(piece.encode())))
        return out

    def _response(self, req: ChatCompletionRequest, gen: Generation) -> ChatCompletionResponse:
        parsed = self.renderer.parse(gen.text, req.tools, req.tool_choice)
        finish = "tool_calls" if parsed.tool_calls else gen.finish_reason
        logprobs = None
        if req.logprobs:
            logprobs = ChoiceLogprobs(content=self._token_logprobs(gen.token_ids, gen.logprobs,
                                                                   req.return_tokens_as_token_ids))
        message = ResponseMessage(
            content=parsed.content if parsed.content is not None else ("" if not parsed.tool_calls else None),
            tool_calls=parsed.tool_calls,
            prompt_token_ids=gen.prompt_ids,
            generation_token_ids=gen.token_ids,
            generation_log_probs=gen.logprobs,
        )
        return ChatCompletionResponse(
            model=self.cfg.model_name,
            choices=[Choice(message=message, logprobs=logprobs, finish_reason=finish, token_ids=gen.token_ids)],
            usage=Usage(prompt_tokens=len(gen.prompt_ids), completion_tokens=len(gen.token_ids),
                        total_tokens=len(gen.prompt_ids) + len(gen.token_ids)),
            prompt_token_ids=gen.prompt_ids,
            temperature=gen.temperature,
        )

    async def _stream(self, req: ChatCompletionRequest, prompt_ids: list[int],
                      opts: SamplingOptions) -> AsyncIterator[str]:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choice: StreamChoice, **extra: Any) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=self.cfg.model_name, choices=[choice], **extra)
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        yield chunk(StreamChoice(delta=DeltaMessage(role="assistant", content="")), prompt_token_ids=prompt_ids)
        # with tools, text is held back and parsed once complete (a tool call is only known then)
        hold = bool(req.tools) and req.tool_choice != "none"
        ids: list[int] = []
        lps: list[float] = []
        text: list[str] = []
        finish = "stop"
        try:
            async for d in self.engine.stream(prompt_ids, opts):
                ids += d.token_ids
                lps += d.logprobs
                text.append(d.text)
                finish = d.finish_reason or finish
                if hold or not (d.token_ids or d.text):
                    continue
                logprobs = (ChoiceLogprobs(content=self._token_logprobs(d.token_ids, d.logprobs,
                                                                         req.return_tokens_as_token_ids))
                            if req.logprobs else None)
                yield chunk(StreamChoice(delta=DeltaMessage(content=d.text), logprobs=logprobs, token_ids=d.token_ids))
        except Exception as e:  # the status line is gone: report in-band, as OpenAI does
            log.exception("stream failed")
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            return
        if hold:
            parsed = self.renderer.parse("".join(text), req.tools, req.tool_choice)
            calls = [dict(index=i, **c.model_dump()) for i, c in enumerate(parsed.tool_calls)] or None
            logprobs = (ChoiceLogprobs(content=self._token_logprobs(ids, lps, req.return_tokens_as_token_ids))
                        if req.logprobs else None)
            yield chunk(StreamChoice(delta=DeltaMessage(content=parsed.content, tool_calls=calls),
                                     logprobs=logprobs, token_ids=ids))
            finish = "tool_calls" if parsed.tool_calls else finish
        usage = None
        if (req.stream_options or {}).get("include_usage"):
            usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(ids),
                          total_tokens=len(prompt_ids) + len(ids))
        yield chunk(StreamChoice(delta=DeltaMessage(), finish_reason=finish), usage=usage)
        yield "data: [DONE]\n\n"

    async def models(self, request: Request) -> Response:
        self._auth(request)
        card = ModelCard(id=self.cfg.model_name, max_model_len=self.engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def tokenize(self, request: Request) -> Response:
        self._auth(request)
        req: TokenizeRequest = await self._body(request, TokenizeRequest)
        self._check_model(req.model)
        if req.messages is not None:
            ids = self.renderer.render(req.messages, req.tools, req.add_generation_prompt)
        elif req.prompt is not None:
            ids = self.engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give either `prompt` or `messages`", "prompt")
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len,
                                             tokens=ids).model_dump())

    async def health(self, request: Request) -> Response:
        try:
            self.engine.check_alive()
        except Exception as e:
            return JSONResponse({"status": "dead", "error": str(e)}, status_code=503)
        return JSONResponse({"status": "ok", "weight_version": self.engine.weight_version})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _guarded(handler):
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as e:
            return e.response()
        except InvalidRequest as e:
            return APIError(400, str(e)).response()
        except EngineAsleep as e:  # a training step holds the accelerator: a retryable condition
            return APIError(503, str(e), type_="service_unavailable", code="engine_asleep").response()
        except Exception as e:
            log.exception("request failed")
            return APIError(500, f"internal error: {e}", type_="server_error").response()

    return endpoint


def policy_routes(engine: Engine, cfg: ServerConfig) -> list[BaseRoute]:
    """The policy endpoints, to be mounted in the process's one Starlette app."""
    s = PolicyServer(engine, cfg)
    return [
        Route("/v1/chat/completions", _guarded(s.chat_completions), methods=["POST"]),
        Route("/v1/models", _guarded(s.models), methods=["GET"]),
        Route("/tokenize", _guarded(s.tokenize), methods=["POST"]),
        Route("/v1/tokenize", _guarded(s.tokenize), methods=["POST"]),
        Route("/health", _guarded(s.health), methods=["GET"]),
    ]


class HTTPServer:
    """uvicorn serving one app as a task of the running event loop (no thread, no process).

        http = await HTTPServer.start(app, "127.0.0.1", 8080)
        ...
        await http.stop()
    """

    def __init__(self, server: Any, task: Any) -> None:
        self._server, self._task = server, task

    @classmethod
    async def start(cls, app: Any, host: str, port: int) -> "HTTPServer":
        import asyncio

        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                timeout_keep_alive=75)
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # the trainer owns signals
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()  # raises the bind error
                raise RuntimeError(f"HTTP server on {host}:{port} exited during start-up")
            await asyncio.sleep(0.05)
        return cls(server, task)

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task
