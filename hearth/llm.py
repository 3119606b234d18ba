"""LLM: the offline, synchronous Python API (vLLM's `LLM`): generate over many prompts at once, or chat."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hearth.config import EngineConfig
from hearth.engine.llm_engine import LLMEngine
from hearth.loader.resolve import resolve_model
from hearth.sampling_params import SamplingParams, TokenLogprob


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0


class LLM:
    """`LLM("smollm2").generate(["Hello"], SamplingParams(temperature=0))`."""

    def __init__(self, model: str, device: str = "cpu", **engine_args):
        self.engine = LLMEngine(resolve_model(model), EngineConfig(**engine_args), device)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (tensor_parallel_size > 1); nothing to do otherwise."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: list[str] | list[list[int]] | str, params: SamplingParams | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:  # fmt: skip
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        outputs: dict[str, RequestOutput] = {}
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"gen-{next(self._ids)}"
            outputs[request_id] = RequestOutput(request_id, ids)
            seq = self.engine.add_request(ids, params, request_id)
            if params.logprobs is not None:
                outputs[request_id].logprobs = seq.logprobs
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                out = outputs[delta.request_id]
                out.token_ids.extend(delta.token_ids)
                out.text += delta.text
                if delta.finished:
                    out.finish_reason = delta.finish_reason
                    out.num_cached_tokens = delta.num_cached_tokens
        return list(outputs.values())

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None, **template_kwargs):
        from hearth.chat.template import load_chat_template

        template = load_chat_template(self.tokenizer)
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text = template.render(conversation, add_generation_prompt=True, **template_kwargs)
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, params)
