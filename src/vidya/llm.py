"""The offline Python API, as vLLM's:

    llm = LLM(model="smollm2", dtype="auto", max_model_len=2048, ...)
    outs = llm.generate(["prompt", ...], SamplingParams(temperature=0, max_tokens=64))
    outs = llm.chat([[{"role": "user", "content": "..."}], ...], params)
"""
from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from vidya.config import EngineArgs
from vidya.engine.llm_engine import LLMEngine
from vidya.outputs import RequestOutput
from vidya.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str = "smollm2", **kwargs) -> None:
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use when given no SamplingParams (as vLLM's): the model's
        generation_config.json sampling fields under generation_config="auto", else the defaults."""
        return SamplingParams(**self.engine.sampling_defaults)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts are strings, token-id lists or {"prompt_token_ids": [...]} dicts."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params or self.get_default_sampling_params()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        try:
            for p, sp in zip(prompts, params):
                p = p["prompt_token_ids"] if isinstance(p, dict) else p
                ids.append(self.engine.add_request(None, p, sp))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = self.engine.apply_chat_template(conv, **(chat_template_kwargs or {}))
            prompts.append({"prompt_token_ids": self.engine.tokenizer(text, add_special_tokens=False).input_ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit=" req", disable=not use_tqdm or len(ids) < 8)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]
