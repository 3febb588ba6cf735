"""An OpenAI-compatible HTTP API, so standard clients (the `openai` package, chat front-ends)
work unchanged: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``, ``POST /v1/chat/completions``.

Requests are checked field by field and refused with OpenAI's error JSON and a 4xx status. With
``stream: true`` the reply is Server-Sent Events, one chunk per piece of text, then
``data: [DONE]``. The optional bearer key is compared in constant time. Chat turns become a
plain-text prompt as documented in ``serving.render_chat``.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .generate import SamplingParams, Usage
from .serving import CHAT_STOP, Busy, ModelHost, NoModel, render_chat


@dataclass
class ApiLimits:
    max_tokens: int = 1024  # per request
    default_max_tokens: int = 256
    max_prompt_chars: int = 32_000
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <key>"


HOST = web.AppKey("model_host", ModelHost)
LIMITS = web.AppKey("api_limits", ApiLimits)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                            "code": self.code}}, status=self.status)


@web.middleware
async def api_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Authentication and OpenAI-shaped errors for everything under /v1/."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    try:
        key = request.app[LIMITS].api_key
        if key:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), key.encode()):
                raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                               kind="authentication_error", code="invalid_api_key")
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status >= 400:
            return ApiError(exc.status, exc.reason, code=str(exc.status)).response()
        raise


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any, check: Callable[[Any], bool],
           rule: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or not check(value):
        raise ApiError(400, f"'{name}' must be {rule}", param=name)
    return value


def _sampling(body: dict, limits: ApiLimits, stop: list[str]) -> SamplingParams:
    number = (int, float)
    max_tokens = _field(body, "max_tokens", int, limits.default_max_tokens,
                        lambda v: 1 <= v <= limits.max_tokens, f"an integer from 1 to {limits.max_tokens}")
    _field(body, "n", int, 1, lambda v: v == 1, "1 (one choice per request)")
    given = body.get("stop")
    stops = [given] if isinstance(given, str) else given or []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    top_k = _field(body, "top_k", int, 0, lambda v: v >= 0, "a non-negative integer (0: off)")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_field(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
        top_p=_field(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=top_k or None,
        repetition_penalty=_field(body, "repetition_penalty", number, 1.0, lambda v: 0 < v <= 10,
                                  "a number in (0, 10]"),
        seed=_field(body, "seed", int, None, lambda v: -(2**63) <= v < 2**64, "an integer from -2**63 to 2**64 - 1"),
        stop=[*stops, *stop],
    )


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    host = request.app[HOST]
    if body.get("model") not in (host.name, None):
        raise _no_such_model(body.get("model"), host)
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    return body


def _check_prompt(prompt: str, limits: ApiLimits, param: str) -> str:
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(400, f"the prompt has {len(prompt):,} characters; the limit is {limits.max_prompt_chars:,}",
                       param=param, code="context_length_exceeded")
    return prompt


def _model(host: ModelHost) -> dict[str, Any]:
    return {"id": host.name, "object": "model", "created": 0, "owned_by": "hived", "weights": host.label}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(request.app[HOST])]})


async def model(request: web.Request) -> web.Response:
    """One model (the ``openai`` client's ``models.retrieve``)."""
    host = request.app[HOST]
    if request.match_info["model"] != host.name:
        raise _no_such_model(request.match_info["model"], host)
    return web.json_response(_model(host))


def _no_such_model(name: object, host: ModelHost) -> ApiError:
    return ApiError(404, f"the model '{name}' does not exist; this server has '{host.name}' (GET /v1/models)",
                    param="model", code="model_not_found")


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    limits = request.app[LIMITS]
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string", param="prompt")
    return await _reply(request, False, _check_prompt(prompt, limits, "prompt"), _sampling(body, limits, []),
                        body.get("stream", False))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    limits = request.app[LIMITS]
    messages = body.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                       and isinstance(m.get("content"), str) for m in messages)):
        raise ApiError(400, "'messages' must be a non-empty list of {role: system|user|assistant, content: text}",
                       param="messages")
    return await _reply(request, True, _check_prompt(render_chat(messages), limits, "messages"),
                        _sampling(body, limits, CHAT_STOP), body.get("stream", False))


def _choice(chat: bool, streaming: bool, text: str | None, finish: str | None) -> dict:
    """One choice in OpenAI's shape for the endpoint (chat or text) and mode (whole or chunk)."""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if not streaming:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}


async def _reply(request: web.Request, chat: bool, prompt: str, params: SamplingParams,
                 streaming: bool) -> web.StreamResponse:
    host = request.app[HOST]
    usage = Usage()
    obj = ("chat.completion" if chat else "text_completion") + (".chunk" if chat and streaming else "")
    common = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "object": obj,
              "created": int(time.time()), "model": host.name}
    pieces = host.stream(prompt, params, usage, chat)
    try:
        if not streaming:
            text = "".join([p async for p in pieces])
            return web.json_response({
                **common, "choices": [_choice(chat, False, text, usage.finish_reason)],
                "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                          "total_tokens": usage.prompt_tokens + usage.completion_tokens}})
        text = await anext(pieces, None)  # errors (busy, no model) still get a status code
    except NoModel as exc:
        raise ApiError(503, str(exc), kind="server_error", code="model_not_ready") from None
    except Busy as exc:
        raise ApiError(429, str(exc), kind="rate_limit_error", code="busy") from None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(choice: dict) -> None:
        await response.write(f"data: {json.dumps({**common, 'choices': [choice]})}\n\n".encode())

    if chat:
        await send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    while text is not None:
        if text:
            await send(_choice(chat, True, text, None))
        text = await anext(pieces, None)
    await send(_choice(chat, True, None, usage.finish_reason))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def add_routes(app: web.Application, host: ModelHost, limits: ApiLimits) -> None:
    app[HOST] = host
    app[LIMITS] = limits
    app.middlewares.append(api_errors)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
