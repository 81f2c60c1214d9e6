"""Request bodies (Pydantic). OpenAI's field names and defaults, plus our extensions."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from common import TASK_NAME_PATTERN
from registry.store import MAX_CHAT_TEMPLATE_CHARS, MAX_VIRTUAL_TOKENS
from server.engine.sampler import SamplingParams, reduce_seed

TASK_NAME = f"^{TASK_NAME_PATTERN}$"


def _utf8(v: str) -> str:
    """Refuse strings that cannot be encoded as UTF-8 (lone surrogates such as "\\ud800"
    in the JSON): nothing we cannot tokenize, store or send back gets in."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text contains an unpaired surrogate at character {e.start}; send valid UTF-8") from None
    return v


Text = Annotated[str, AfterValidator(_utf8)]


def _whole(v):
    """An integer field takes a JSON integer or a whole-number float (`1.0`: JSON Schema's
    "integer" includes it, and so does OpenAI's API), never a boolean or a string."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_whole)]
PromptInput = Text | list[Text] | list[Int] | list[list[Int]]

# Strict types (a JSON `true` is not the integer 1, "16" is not 16); no NaN or Infinity.
_STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)

    max_tokens: Int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=100.0)  # below 1e-5: greedy (see SamplingParams)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)  # a tiny top_p keeps the top token only
    top_k: Int | None = Field(0, ge=-1)
    seed: Int | None = None  # any integer; reduced modulo 2**64 (the generator's seed space)
    stop: Text | list[Text] | None = None
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(1.0, ge=1e-3, le=1e3)  # the range float32 logits take safely
    logprobs: Int | None = Field(None, ge=0, le=20)
    stop_on_repetition: bool | None = None  # end a looping output ("repetition"); None: --stop-on-repetition
    return_token_ids: bool = False
    timeout: float | None = Field(None, gt=0.0, le=86400.0)  # seconds from arrival; extension

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        if isinstance(v, list) and any(len(s) > 1024 for s in v) or isinstance(v, str) and len(v) > 1024:
            raise ValueError("a stop string is at most 1024 characters")
        return v

    def sampling_params(self, seed_offset: int = 0, *, prompt_logprobs: int | None = None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        seed = None if self.seed is None else reduce_seed(self.seed + seed_offset)
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
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(SamplingFields):
    model: str
    prompt: PromptInput
    n: Int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    max_tokens: Int | None = Field(16, ge=0)  # 0 only with echo: the prompt's log-probs alone
    # echo: the prompt comes back before the completion, with its tokens' log-probs when
    # `logprobs` is set (the first one null), as OpenAI's legacy completions did
    echo: bool = False
    # OpenAI fields we accept only at their neutral values
    best_of: Int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _max_tokens_zero(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 asks for nothing without echo: send max_tokens >= 1, or echo: true "
                             "for the prompt's log-probs")
        return self

    def unsupported(self) -> str | None:
        if self.best_of not in (None, 1, self.n):
            return "best_of is not supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty/frequency_penalty are not supported; use repetition_penalty"
        if self.logit_bias:
            return "logit_bias is not supported"
        if self.suffix:
            return "suffix is not supported"
        return None


    def sampling_params(self, seed_offset: int = 0, *, prompt_logprobs: int | None = None) -> SamplingParams:
        """With echo and `logprobs`, the prompt's log-probs too (with as many alternatives);
        echo with max_tokens 0 and no `logprobs` computes them without alternatives."""
        if self.echo and prompt_logprobs is None and (self.logprobs is not None or self.max_tokens == 0):
            prompt_logprobs = self.logprobs or 0
        return super().sampling_params(seed_offset, prompt_logprobs=prompt_logprobs)


class ScoreRequest(BaseModel):
    """POST /v1/score: the log-prob of each candidate continuing the prompt."""
    model_config = ConfigDict(extra="forbid", **_STRICT)

    model: str
    prompt: Text | list[Int] = Field(min_length=1)
    candidates: list[Text | list[Int]] = Field(min_length=1, max_length=64)
    timeout: float | None = Field(None, gt=0.0, le=86400.0)

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v):
        if any(len(c) == 0 for c in v):
            raise ValueError("a candidate is empty: each needs at least one token")
        return v


class GenerateItem(SamplingFields):
    task: str
    prompt: Text | list[Int]


class GenerateRequest(BaseModel):
    model_config = _STRICT

    requests: list[GenerateItem] = Field(min_length=1, max_length=4096)


def _no_nul(v: str) -> str:
    if "\x00" in v:  # no database text column takes one
        raise ValueError("must not contain NUL characters")
    return v


# A task's own Jinja chat template (whether it renders is checked by the route: a 400)
ChatTemplate = Annotated[Text, Field(min_length=1, max_length=MAX_CHAT_TEMPLATE_CHARS,
                                     description="Jinja chat template, as transformers' apply_chat_template "
                                                 "takes it (null: the server's)"),
                         AfterValidator(_no_nul)]


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", **_STRICT)

    name: str = Field(pattern=TASK_NAME)
    description: Text = Field("", max_length=4096)
    num_virtual_tokens: Int = Field(20, ge=1, le=MAX_VIRTUAL_TOKENS)
    init: Literal["random", "text", "vocab"] = "random"
    init_text: Text | None = Field(None, max_length=20000)
    seed: Int | None = Field(None, ge=-(2**63), lt=2**64)
    chat_template: ChatTemplate | None = None


class TaskActivate(BaseModel):
    model_config = _STRICT

    version: Int = Field(ge=1, lt=2**63)


class TaskUpdate(BaseModel):
    """PATCH /v1/tasks/{name}: the settings sent change, the others stay (an empty body changes
    nothing); `chat_template: null` goes back to the server's template."""
    model_config = ConfigDict(extra="forbid", **_STRICT)

    chat_template: ChatTemplate | None = None


# ------------------------------------------------------------------ /v1/chat/completions

class ChatTextPart(BaseModel):
    """One part of a message's content: text only (GPT-2 reads no images or audio; another
    part type is a 422 naming the field)."""
    model_config = ConfigDict(extra="ignore", **_STRICT)

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)

    role: Literal["system", "user", "assistant"]
    content: Text | list[ChatTextPart]
    name: Text | None = Field(None, max_length=256)

    def text(self) -> str:
        """The content as one string: text parts joined by newlines (as vLLM joins them)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """OpenAI's chat body. `logprobs` is a boolean here, with `top_logprobs` the number of
    alternatives; `max_completion_tokens` is OpenAI's newer name for `max_tokens`."""
    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    n: Int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    logprobs: bool | None = None  # type: ignore[assignment]
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    max_completion_tokens: Int | None = Field(None, ge=1)
    # OpenAI fields we accept only at their neutral values
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> str | None:
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty/frequency_penalty are not supported; use repetition_penalty"
        if self.logit_bias:
            return "logit_bias is not supported"
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            return "tools/function calling are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format other than {\"type\": \"text\"} is not supported"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs needs logprobs: true"
        if self.max_completion_tokens is not None and "max_tokens" in self.model_fields_set \
                and self.max_tokens not in (None, self.max_completion_tokens):
            return "max_tokens and max_completion_tokens differ; send one of them"
        return None

    def sampling_params(self, seed_offset: int = 0) -> SamplingParams:
        """As a completion's, with the chat meaning of `logprobs` and `max_completion_tokens`."""
        p = super().sampling_params(seed_offset)
        max_tokens = self.max_completion_tokens or p.max_tokens
        return replace(p, max_tokens=max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None)
