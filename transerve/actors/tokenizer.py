"""Tokenizer actor: chat template (with tools) and tokenization, then hands the request to the scheduler;
also decides how the detokenizer parses the answer (tool-call syntax, thoughts)."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from transerve.actors.messages import (
    Abort, OpenStream, OutputOptions, ParserSpec, RequestError, TokenizedRequest, TokenizeRequest,
)
from transerve.actors.tool_formats import END_THINK, THINK, detect_tool_format, tool_call_structure
from transerve.engine.grammar import Constraint, GrammarCompiler, GrammarError
from transerve.engine.request import ContextLengthError, GrammarKind, GrammarSpec, fit_max_tokens
from transerve.media.errors import PromptError

log = logging.getLogger(__name__)


def tokenize(tokenizer, request: TokenizeRequest, render=None) -> tuple[list[int], str]:
    """The prompt's token ids, and its text when a chat template rendered it (for the output parser).

    `render(messages, template_kwargs) -> str` replaces the tokenizer's own chat template rendering
    (a VLM's, whose templates want content parts)."""
    if request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError("this model has no chat template; use /v1/completions", "messages")
        kwargs = dict(request.chat_template_kwargs)
        if request.tools:
            kwargs["tools"] = list(request.tools)
        if render is not None:
            text = render(list(request.messages), kwargs)
        else:
            try:
                text = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False,
                                                     **kwargs)
            except Exception as exc:  # jinja raises for conversations the template forbids (roles out of order, ...)
                raise PromptError(f"the chat template rejected these messages: {exc}", "messages") from exc
        # What apply_chat_template(tokenize=True) does: the template writes the special tokens itself.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), text
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids), ""
    return tokenizer(request.prompt or "", add_special_tokens=True)["input_ids"], ""


async def build_prompt(tokenizer, request: TokenizeRequest, image_prompts=None) -> tuple[list[int], str, Any]:
    """(token ids, rendered text, the MultimodalPrompt or None): a prompt with images through the VLM's
    processor in a worker thread, any other through `tokenize`. Raises PromptError for a bad prompt."""
    if request.images:
        if image_prompts is None:
            raise PromptError("this model does not accept images", "messages")
        return await anyio.to_thread.run_sync(image_prompts.build, request)
    ids, text = tokenize(tokenizer, request, image_prompts and image_prompts.render)
    return ids, text, None


class ParserSpecs:
    """Resolves a request's OutputOptions against this model: which tool-call syntax its template
    speaks, whether it thinks in <think> tags, whether the prompt already opened a thought."""

    def __init__(self, tokenizer) -> None:
        template = getattr(tokenizer, "chat_template", None) or ""
        if isinstance(template, dict):  # named templates: look at all of them
            template = "\n".join(template.values())
        self.tool_format = detect_tool_format(template, tokenizer.get_vocab())
        self.template_thinks = THINK in template

    def spec(self, options: OutputOptions, prompt_text: str) -> ParserSpec | None:
        reasoning = options.reasoning and (self.template_thinks or THINK in prompt_text)
        if not (options.tools or reasoning):
            return None
        in_reasoning = reasoning and prompt_text.rfind(THINK) > prompt_text.rfind(END_THINK)
        return ParserSpec(self.tool_format if options.tools else None, reasoning, in_reasoning, options.parallel_tool_calls)


class Grammars:
    """Compiles requests' grammars for this model, in a worker thread: the tool-call syntax is the model's,
    and a prompt that ends inside a thought gets its grammar only after the thought ends."""

    def __init__(self, tokenizer, vocab_size: int, tool_format: str) -> None:
        self.tokenizer, self.vocab_size, self.tool_format = tokenizer, vocab_size, tool_format
        self.compiler: GrammarCompiler | None = None  # built on first use: reading the vocabulary takes a moment
        end_think = tokenizer.convert_tokens_to_ids(END_THINK) if END_THINK in tokenizer.get_vocab() else None
        self.end_think: int | None = end_think

    async def constraint(self, spec: GrammarSpec, parser: ParserSpec | None) -> Constraint:
        if spec.kind is GrammarKind.TOOL_CALLS:
            calls = json.loads(spec.spec)
            structure = tool_call_structure(self.tool_format, calls["tools"], calls["parallel"])
            spec = dataclasses.replace(spec, kind=GrammarKind.STRUCTURAL_TAG, spec=json.dumps(structure))
        grammar = await anyio.to_thread.run_sync(self._compile, spec)
        thinking = parser is not None and parser.in_reasoning
        return Constraint(grammar, self.end_think if thinking else None)

    def _compile(self, spec: GrammarSpec):
        if self.compiler is None:
            self.compiler = GrammarCompiler(self.tokenizer, self.vocab_size or len(self.tokenizer))
        return self.compiler.compile(spec)


async def tokenizer_actor(
    tokenizer,
    max_model_len: int,
    kv_capacity: int,
    inbox: ObjectReceiveStream[TokenizeRequest | Abort],
    to_detokenizer: ObjectSendStream[OpenStream],
    to_scheduler: ObjectSendStream[TokenizedRequest | Abort],
    image_prompts=None,
    vocab_size: int = 0,
) -> None:
    """Aborts pass through here too, so an abort never overtakes the request it cancels.

    `image_prompts` (media/processor.py) prepares a VLM's prompts with images, in a worker thread.
    `vocab_size`: the LM head's rows, the width of constrained decoding's token bitmask."""
    specs = ParserSpecs(tokenizer)
    grammars = Grammars(tokenizer, vocab_size, specs.tool_format)
    async with inbox, to_detokenizer, to_scheduler:
        async for message in inbox:
            if isinstance(message, Abort):
                await to_scheduler.send(message)
                continue
            request = message
            try:
                ids, prompt_text, multimodal = await build_prompt(tokenizer, request, image_prompts)
                params = fit_max_tokens(request.sampling_params, len(ids), max_model_len, kv_capacity)
                parser = specs.spec(request.output, prompt_text)
                constraint = None
                if params.grammar is not None:  # the tokenizer waits for the compile; the batch does not
                    constraint = await grammars.constraint(params.grammar, parser)
            except GrammarError as exc:
                await _fail(request, RequestError(str(exc), 400, exc.param, request.index))
                continue
            except ContextLengthError as exc:
                param = exc.field if exc.field != "prompt" or request.messages is None else "messages"
                await _fail(request, RequestError(str(exc), 400, param, request.index))
                continue
            except PromptError as exc:
                await _fail(request, RequestError(str(exc), 400, exc.param, request.index))
                continue
            except Exception as exc:  # a tokenizer bug must fail one request, not the server
                log.exception("tokenization failed")
                await _fail(request, RequestError(f"tokenization failed: {exc}", 500, index=request.index))
                continue
            await to_detokenizer.send(OpenStream(request.request_id, request.stop, request.sink, request.index, parser))
            await to_scheduler.send(TokenizedRequest(request.request_id, tuple(ids), params, multimodal, constraint))


async def _fail(request: TokenizeRequest, error: RequestError) -> None:
    try:
        await request.sink.send(error)
    except Exception:  # the client is already gone
        pass
    await request.sink.aclose()
