"""Tokenizer actor: chat template and tokenization, then hands the request to the scheduler."""

from __future__ import annotations

import dataclasses
import logging

from anyio.abc import ObjectReceiveStream, ObjectSendStream

from transerve.actors.messages import Abort, OpenStream, RequestError, TokenizedRequest, TokenizeRequest

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def tokenize(tokenizer, request: TokenizeRequest) -> list[int]:
    if request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise TokenizerError("this model has no chat template; use /v1/completions", "messages")
        try:
            ids = tokenizer.apply_chat_template(
                list(request.messages), add_generation_prompt=True, tokenize=True, return_dict=True,
                **dict(request.chat_template_kwargs),
            )["input_ids"]
        except Exception as exc:  # jinja raises for conversations the template forbids (roles out of order, ...)
            raise TokenizerError(f"the chat template rejected these messages: {exc}", "messages") from exc
        return list(ids)
    return tokenizer(request.prompt or "", add_special_tokens=True)["input_ids"]


def fit_to_context(ids: list[int], request: TokenizeRequest, max_model_len: int, max_tokens_given: bool):
    """The request's sampling params with max_tokens set, or an error when it cannot fit."""
    room = max_model_len - len(ids)
    if room < 1:
        raise TokenizerError(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has {len(ids)} tokens",
            "messages" if request.messages is not None else "prompt",
        )
    params = request.sampling_params
    if max_tokens_given and params.max_tokens > room:
        raise TokenizerError(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {len(ids)} tokens "
            f"and {params.max_tokens} more were asked for (max_tokens)",
            "max_tokens",
        )
    return dataclasses.replace(params, max_tokens=min(params.max_tokens, room))


async def tokenizer_actor(
    tokenizer,
    max_model_len: int,
    inbox: ObjectReceiveStream[tuple[TokenizeRequest, bool] | Abort],
    to_detokenizer: ObjectSendStream[OpenStream],
    to_scheduler: ObjectSendStream[TokenizedRequest | Abort],
) -> None:
    """Aborts pass through here too, so an abort never overtakes the request it cancels."""
    async with inbox, to_detokenizer, to_scheduler:
        async for message in inbox:
            if isinstance(message, Abort):
                await to_scheduler.send(message)
                continue
            request, max_tokens_given = message
            try:
                ids = tokenize(tokenizer, request)
                params = fit_to_context(ids, request, max_model_len, max_tokens_given)
            except TokenizerError as exc:
                await _fail(request, RequestError(str(exc), 400, exc.param))
                continue
            except Exception as exc:  # a tokenizer bug must fail one request, not the server
                log.exception("tokenization failed")
                await _fail(request, RequestError(f"tokenization failed: {exc}", 500))
                continue
            await to_detokenizer.send(OpenStream(request.request_id, request.stop, request.sink))
            await to_scheduler.send(TokenizedRequest(request.request_id, tuple(ids), params))


async def _fail(request: TokenizeRequest, error: RequestError) -> None:
    try:
        await request.sink.send(error)
    except Exception:  # the client is already gone
        pass
    await request.sink.aclose()
