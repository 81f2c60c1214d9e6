"""/v1/chat/completions and /v1/models/{id} through the official `openai` SDK against a real
server (a `polyprompt serve` subprocess): what a user's client does, errors included."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.serverutil import running_server

pytestmark = pytest.mark.slow

SYSTEM, USER = "Answer briefly.", "Name a colour."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
RENDERED = f"System: {SYSTEM}\nUser: {USER}\nAssistant:"  # the default template's text for MESSAGES
CUSTOM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns here') }}"
          "{% endif %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
          "{% if add_generation_prompt %}<assistant>{% endif %}")
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True, "return_token_ids": True})
# a task's own template, and what it makes of MESSAGES
TASK_TEMPLATE = ("{% for m in messages %}### {{ m['role'] | upper }}\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}### ASSISTANT\n{% endif %}")
TASK_RENDERED = f"### SYSTEM\n{SYSTEM}\n### USER\n{USER}\n### ASSISTANT\n"


def _start(tiny_model_dir, data: Path, *flags: str):
    """A server with two tasks (`alpha` with 5 random virtual tokens, `gamma` text-initialised)."""
    cm = running_server(tiny_model_dir, data, "--device", "cpu", "--dtype", "float32", "--no-cuda-graphs", *flags)
    url = cm.__enter__()
    tasks = {}
    for body in ({"name": "alpha", "num_virtual_tokens": 5, "seed": 1},
                 {"name": "gamma", "init": "text", "init_text": "Colours:", "num_virtual_tokens": 4}):
        r = httpx.post(f"{url}/v1/tasks", json=body, timeout=30)
        assert r.status_code == 201, r.text
        tasks[body["name"]] = r.json()
    return cm, url, tasks


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-chat")


@pytest.fixture(scope="module")
def server(tiny_model_dir, chat_data):
    cm, url, tasks = _start(tiny_model_dir, chat_data)
    try:
        yield url, tasks
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def base_id(tiny_model_dir) -> str:
    return Path(tiny_model_dir).resolve().name


def _unix(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())


def _extra(obj, key):
    """A field our server adds (token_ids), as the SDK keeps it on its objects."""
    return (obj.model_extra or {})[key]


# ------------------------------------------------------------------ models

def test_models_retrieve_task_and_base(client, server, base_id):
    _, tasks = server
    for name in ("alpha", "gamma"):
        m = client.models.retrieve(name)
        assert (m.id, m.object, m.owned_by) == (name, "model", "polyprompt")
        assert m.created == _unix(tasks[name]["created_at"])
    base = client.models.retrieve(base_id)
    assert base.id == base_id and isinstance(base.created, int) and base.created > 0
    listed = {m.id: m.created for m in client.models.list()}
    assert listed == {base_id: base.created, "alpha": _unix(tasks["alpha"]["created_at"]),
                      "gamma": _unix(tasks["gamma"]["created_at"])}


def test_models_retrieve_unknown_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-task")
    assert e.value.status_code == 404 and e.value.code == "model_not_found"


# ------------------------------------------------------------------ chat

def test_chat_plain_and_streamed_agree(client):
    plain = client.chat.completions.create(model="alpha", messages=MESSAGES, **GREEDY)
    assert plain.object == "chat.completion" and len(plain.choices) == 1
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and plain.usage.completion_tokens == 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 12

    chunks = list(client.chat.completions.create(model="alpha", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason] == ["length"]
    assert with_choices[-1].choices[0].finish_reason == "length"  # the finish comes last
    assert not chunks[-1].choices and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    streamed_ids = [t for c in with_choices for t in (c.choices[0].model_extra or {}).get("token_ids", [])]
    assert streamed_ids == _extra(choice, "token_ids")


def test_default_template_is_a_completion_of_the_rendered_text(client):
    """What the model sees: "System: ...\\nUser: ...\\nAssistant:", with the task's soft prompt in front."""
    chat = client.chat.completions.create(model="gamma", messages=MESSAGES, **GREEDY)
    comp = client.completions.create(model="gamma", prompt=RENDERED, **GREEDY)
    assert _extra(chat.choices[0], "token_ids") == _extra(comp.choices[0], "token_ids")
    assert chat.choices[0].message.content == comp.choices[0].text
    assert chat.usage.prompt_tokens == comp.usage.prompt_tokens
    # content as text parts: joined by newlines
    parts = [{"role": "system", "content": [{"type": "text", "text": "Answer"}, {"type": "text", "text": "briefly."}]},
             {"role": "user", "content": USER}]
    by_parts = client.chat.completions.create(model="gamma", messages=parts, **GREEDY)
    comp = client.completions.create(model="gamma", prompt=RENDERED.replace("Answer briefly.", "Answer\nbriefly."),
                                     **GREEDY)
    assert _extra(by_parts.choices[0], "token_ids") == _extra(comp.choices[0], "token_ids")


def test_base_model_chat_and_soft_prompt_matters(client, base_id):
    base = client.chat.completions.create(model=base_id, messages=MESSAGES, **GREEDY)
    comp = client.completions.create(model=base_id, prompt=RENDERED, **GREEDY)
    assert _extra(base.choices[0], "token_ids") == _extra(comp.choices[0], "token_ids")
    task = client.chat.completions.create(model="alpha", messages=MESSAGES, **GREEDY)
    assert _extra(task.choices[0], "token_ids") != _extra(base.choices[0], "token_ids")


def test_n_seed_and_logprobs(client):
    kw = dict(model="alpha", messages=MESSAGES, n=3, seed=7, temperature=1.0, max_tokens=8,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # seed + i per choice
    assert a.usage.completion_tokens == 24
    lp = client.chat.completions.create(model="alpha", messages=MESSAGES, logprobs=True, top_logprobs=3, **GREEDY)
    content = lp.choices[0].logprobs.content
    assert len(content) == 12
    joined = b"".join(bytes(t.bytes) for t in content)  # a token may be part of a character: join bytes
    assert joined.decode("utf-8", errors="replace") == lp.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the top token
        assert t.top_logprobs[0].logprob == t.logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob


def test_errors_raise_the_sdk_classes(client):
    create = client.chat.completions.create
    with pytest.raises(openai.NotFoundError) as e:
        create(model="no-such-task", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        create(model="alpha", messages=MESSAGES, max_tokens=5000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="tools"):
        create(model="alpha", messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        create(model="alpha", messages=MESSAGES, top_logprobs=2)
    bad = [dict(messages=[]), dict(messages=[{"role": "tool", "content": "x"}]),
           dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
           dict(messages=MESSAGES, temperature=-1), dict(messages=MESSAGES, n=0),
           dict(messages=MESSAGES, max_tokens=0), dict(messages=[{"role": "user"}])]
    for kw in bad:
        with pytest.raises(openai.UnprocessableEntityError):
            create(model="alpha", **kw)
    with pytest.raises(openai.UnprocessableEntityError):  # a stream is refused before it opens
        create(model="alpha", messages=[], stream=True)


# ------------------------------------------------------------------ a task's own template

def _tokens(client, model, **kw):
    if "messages" in kw:
        out = client.chat.completions.create(model=model, **kw, **GREEDY)
    else:
        out = client.completions.create(model=model, **kw, **GREEDY)
    return _extra(out.choices[0], "token_ids"), out.usage.prompt_tokens


def _sees(client, model, text) -> bool:
    """Whether a chat request for MESSAGES gives exactly the completion of `text`."""
    return _tokens(client, model, messages=MESSAGES) == _tokens(client, model, prompt=text)


def test_task_template_is_a_completion_of_its_text(client, server, base_id):
    """A task created with `chat_template`: its chat requests are completions of that template's
    text (soft prompt in front); other tasks and the base model keep the default."""
    url, _ = server
    r = httpx.post(f"{url}/v1/tasks", json={"name": "tmpl", "num_virtual_tokens": 6, "seed": 3,
                                            "chat_template": TASK_TEMPLATE}, timeout=30)
    assert r.status_code == 201, r.text
    assert httpx.get(f"{url}/v1/tasks/tmpl", timeout=30).json()["chat_template"] == TASK_TEMPLATE
    chat = client.chat.completions.create(model="tmpl", messages=MESSAGES, **GREEDY)
    comp = client.completions.create(model="tmpl", prompt=TASK_RENDERED, **GREEDY)
    assert _extra(chat.choices[0], "token_ids") == _extra(comp.choices[0], "token_ids")
    assert chat.choices[0].message.content == comp.choices[0].text
    assert chat.usage.prompt_tokens == comp.usage.prompt_tokens
    assert not _sees(client, "tmpl", RENDERED)  # the template matters
    for model in ("alpha", base_id):
        assert _sees(client, model, RENDERED)


def test_task_template_changes_go_live(client, server, chat_data):
    """PATCH on this server: the next request renders with it; a change written to the registry by
    another process: live within the poll interval; null: back to the default. No restart."""
    from registry import Registry
    from registry.paths import default_db_url

    url, _ = server
    r = httpx.post(f"{url}/v1/tasks", json={"name": "tmpl-live", "num_virtual_tokens": 3, "seed": 5}, timeout=30)
    assert r.status_code == 201, r.text
    assert _sees(client, "tmpl-live", RENDERED)
    r = httpx.patch(f"{url}/v1/tasks/tmpl-live", json={"chat_template": TASK_TEMPLATE}, timeout=30)
    assert r.status_code == 200 and r.json()["chat_template"] == TASK_TEMPLATE, r.text
    assert _sees(client, "tmpl-live", TASK_RENDERED)
    reg = Registry(default_db_url(chat_data), chat_data)  # another process's write, as `polyprompt tasks` makes
    try:
        reg.update_task("tmpl-live", chat_template="Q: {{ messages[-1]['content'] }}\nA:")
    finally:
        reg.close()
    deadline = time.monotonic() + 20
    while not _sees(client, "tmpl-live", f"Q: {USER}\nA:"):
        assert time.monotonic() < deadline, "the registry change was not picked up"
        time.sleep(0.2)
    r = httpx.patch(f"{url}/v1/tasks/tmpl-live", json={"chat_template": None}, timeout=30)
    assert r.status_code == 200 and r.json()["chat_template"] is None, r.text
    assert _sees(client, "tmpl-live", RENDERED)


def test_bad_task_template_is_refused(client, server):
    url, _ = server
    for bad, needle in (("{% for m in messages %}{{ m['content'] }}", "TemplateSyntaxError"),
                        ("{{ raise_exception('user turns only') }}", "user turns only")):
        r = httpx.post(f"{url}/v1/tasks", json={"name": "tmpl-bad", "chat_template": bad}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_chat_template" and needle in err["message"], err
        assert httpx.get(f"{url}/v1/tasks/tmpl-bad", timeout=30).status_code == 404
        r = httpx.patch(f"{url}/v1/tasks/alpha", json={"chat_template": bad}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_chat_template", r.text
    assert httpx.get(f"{url}/v1/tasks/alpha", timeout=30).json()["chat_template"] is None
    assert _sees(client, "alpha", RENDERED)


# ------------------------------------------------------------------ a server's own template

@pytest.mark.parametrize("as_file", [True, False])
def test_custom_chat_template(tiny_model_dir, tmp_path, as_file):
    path = tmp_path / "chat.jinja"
    path.write_text(CUSTOM)
    cm, url, _ = _start(tiny_model_dir, tmp_path / "data", "--chat-template", str(path) if as_file else CUSTOM)
    try:
        c = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": USER}]
        chat = c.chat.completions.create(model="alpha", messages=msgs, **GREEDY)
        text = f"<user>Hi</user>\n<assistant>Hello.</assistant>\n<user>{USER}</user>\n<assistant>"
        comp = c.completions.create(model="alpha", prompt=text, **GREEDY)
        assert _extra(chat.choices[0], "token_ids") == _extra(comp.choices[0], "token_ids")
        assert chat.usage.prompt_tokens == comp.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError, match="no system turns here") as e:  # the template's own error
            c.chat.completions.create(model="alpha", messages=MESSAGES)
        assert e.value.code == "chat_template_error"
        # a task's own template comes before the server's
        r = httpx.post(f"{url}/v1/tasks", json={"name": "own", "num_virtual_tokens": 2,
                                                "chat_template": TASK_TEMPLATE}, timeout=30)
        assert r.status_code == 201, r.text
        assert _sees(c, "own", TASK_RENDERED)
    finally:
        cm.__exit__(None, None, None)


def test_unreadable_template_file_says_so(tiny_model_dir, tmp_path):
    cm, url, _ = _start(tiny_model_dir, tmp_path / "data", "--chat-template", str(tmp_path / "missing.jinja"))
    try:
        c = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError, match="missing.jinja"):
            c.chat.completions.create(model="alpha", messages=MESSAGES)
    finally:
        cm.__exit__(None, None, None)
