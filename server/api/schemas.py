"""Request bodies (Pydantic). OpenAI's field names and defaults, plus our extensions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.engine.sampler import SamplingParams

TASK_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
PromptInput = str | list[str] | list[int] | list[list[int]]


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=100.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(0, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(1.0, gt=0.0)
    logprobs: int | None = Field(None, ge=0, le=20)
    stop_on_repetition: bool = False
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def sampling_params(self, seed_offset: int = 0) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        seed = None if self.seed is None else self.seed + seed_offset
        return SamplingParams(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            seed=seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logprobs=self.logprobs,
            stop_on_repetition=self.stop_on_repetition,
        )


class CompletionRequest(SamplingFields):
    model: str
    prompt: PromptInput
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    # OpenAI fields we accept only at their neutral values
    echo: bool = False
    best_of: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported"
        if self.best_of not in (None, 1, self.n):
            return "best_of is not supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty/frequency_penalty are not supported; use repetition_penalty"
        if self.logit_bias:
            return "logit_bias is not supported"
        if self.suffix:
            return "suffix is not supported"
        return None


class GenerateItem(SamplingFields):
    task: str
    prompt: str | list[int]


class GenerateRequest(BaseModel):
    requests: list[GenerateItem] = Field(min_length=1, max_length=4096)


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=TASK_NAME)
    description: str = Field("", max_length=4096)
    num_virtual_tokens: int = Field(20, ge=1, le=512)
    init: Literal["random", "text", "vocab"] = "random"
    init_text: str | None = Field(None, max_length=20000)
    seed: int | None = None


class TaskActivate(BaseModel):
    version: int = Field(ge=1)
