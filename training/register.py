"""Registering a trained prompt: straight into the registry, or uploaded to a server.

Both targets first say what they know (`describe`: the base model they are on and the
task, if it exists, whose settings the run then keeps), are checked *before* training
(the task exists or --create was given, the base model and hidden size match) so a long
run does not end in a refusal, and written only *after* training succeeded, so a failed
or interrupted run leaves the registry as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    import torch


class RegisterError(RuntimeError):
    """The prompt cannot be registered where asked (exit code 2)."""


def _missing_task(name: str, where: str) -> RegisterError:
    return RegisterError(
        f"task {name!r} does not exist in {where}; pass --create to create it, "
        "or register it first (POST /v1/tasks or the server's API)")


def check_name(name: str) -> None:
    from registry.errors import InvalidName
    from registry.store import validate_name

    try:
        validate_name(name)
    except InvalidName as e:
        raise RegisterError(str(e)) from None


# ---------------------------------------------------------------- local registry
class LocalTarget:
    def __init__(self, registry, name: str, *, create: bool, model_id: str | None = None,
                 hidden_size: int | None = None, description: str = ""):
        self.registry, self.name, self.create = registry, name, create
        self.model_id, self.hidden_size, self.description = model_id, hidden_size, description
        self.where = "the registry"

    def describe(self) -> tuple[str | None, str, str, dict[str, Any] | None]:
        """(base model id or None, whose it is, why none is known, the task or None): an existing
        task's base model; for a new one (--create) None (`registry.cli_common.new_task_base_model`
        then decides)."""
        task = self._existing()
        if task is None:
            return None, f"new task {self.name!r}", "", None
        return task["base_model"], f"task {self.name!r}", "", task

    def _existing(self) -> dict[str, Any] | None:
        """The task, None if it is new (allowed only with --create)."""
        from registry.errors import TaskNotFound

        check_name(self.name)
        try:
            return self.registry.get_task(self.name)
        except TaskNotFound:
            if not self.create:
                raise _missing_task(self.name, self.where) from None
            return None

    def check(self) -> None:
        from registry.cli_common import same_model

        task = self._existing()
        if task is None:
            return
        if self.model_id is not None and not same_model(task["base_model"], self.model_id):
            raise RegisterError(f"task {self.name!r} belongs to base model {task['base_model']!r}, "
                                f"but this run trains on {self.model_id!r}; pass the same --model")
        if self.hidden_size is not None and task["hidden_size"] != self.hidden_size:
            raise RegisterError(f"task {self.name!r} has hidden size {task['hidden_size']}, "
                                f"the model has {self.hidden_size}")

    def register(self, prompt: torch.Tensor, *, meta: dict[str, Any], **_: Any) -> dict[str, Any]:
        from registry.errors import TaskExists, TaskNotFound

        try:
            self.registry.get_task(self.name)
        except TaskNotFound:
            if not self.create:
                raise _missing_task(self.name, self.where) from None
            try:  # the task and this prompt as its version 1, in one transaction
                task = self.registry.create_task(self.name, description=self.description, base_model=self.model_id,
                                                 embeddings=prompt, source="train", meta=meta)
                return {"task": self.name, "version": task["active_version"], "sha256": task["sha256"]}
            except TaskExists:
                pass  # created concurrently: this prompt becomes its next version
        v = self.registry.add_version(self.name, prompt, source="train", meta=meta, base_model=self.model_id)
        return {"task": self.name, "version": v["version"], "sha256": v["sha256"]}


# ---------------------------------------------------------------- HTTP server
def admin_key() -> str | None:
    return os.environ.get("POLYPROMPT_ADMIN_KEY") or os.environ.get("POLYPROMPT_API_KEY") or None


class ServerTarget:
    def __init__(self, url: str, name: str, *, create: bool, description: str = "", timeout: float = 60.0):
        self.url, self.name, self.create, self.description = url.rstrip("/"), name, create, description
        self.timeout = timeout
        self.where = f"the server at {self.url}"
        self.exists, self.described = False, False

    def _client(self):
        import httpx

        key = admin_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout)

    def _fail(self, r, what: str) -> RegisterError:
        try:
            msg = r.json()["error"]["message"]
        except Exception:
            msg = r.text[:500]
        hint = " (set POLYPROMPT_ADMIN_KEY)" if r.status_code in (401, 403) else ""
        return RegisterError(f"{what}: HTTP {r.status_code}: {msg}{hint}")

    def describe(self) -> tuple[str | None, str, str, dict[str, Any] | None]:
        """(the served base model from GET /health, whose it is, why none is known, the task or
        None). The server serves one base model, so that one is the task's, new or not."""
        import httpx

        check_name(self.name)
        try:
            with self._client() as c:
                h = c.get("/health")
                r = c.get(f"/v1/tasks/{quote(self.name)}")
        except httpx.HTTPError as e:
            raise RegisterError(f"cannot reach {self.url}: {e}") from None
        self.described = True
        model = None
        if h.status_code == 200:
            try:
                model = h.json().get("model")
            except (ValueError, AttributeError):
                model = None
        model = model if isinstance(model, str) and model else None
        why = "" if model else f"GET {self.url}/health (HTTP {h.status_code}) names no model"
        if r.status_code == 404:
            if not self.create:
                raise _missing_task(self.name, self.where)
            return model, self.where, why, None
        if r.status_code != 200:
            raise self._fail(r, f"checking task {self.name!r}")
        self.exists = True
        try:
            task = r.json()
        except ValueError:
            raise self._fail(r, f"checking task {self.name!r}") from None
        return model, self.where, why, task if isinstance(task, dict) else None

    def check(self) -> None:
        if not self.described:
            self.describe()
        if not self.exists and not self.create:
            raise _missing_task(self.name, self.where)

    def register(self, prompt: torch.Tensor, *, meta: dict[str, Any], base_model: str | None = None,
                 num_layers: int, num_attention_heads: int) -> dict[str, Any]:
        import httpx

        from adapters.peft_format import write_adapter_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = write_adapter_folder(Path(tmp), prompt, base_model=base_model, num_layers=num_layers,
                                          num_attention_heads=num_attention_heads)
            files = {n: (n, (folder / n).read_bytes(), "application/octet-stream")
                     for n in ("adapter_model.safetensors", "adapter_config.json")}
        try:
            with self._client() as c:
                if not self.exists:
                    body = {"name": self.name, "num_virtual_tokens": int(prompt.shape[0])}
                    if self.description:
                        body["description"] = self.description
                    r = c.post("/v1/tasks", json=body)
                    if r.status_code not in (200, 201, 409):
                        raise self._fail(r, f"creating task {self.name!r}")
                r = c.post(f"/v1/tasks/{quote(self.name)}/prompt", files=files)
        except httpx.HTTPError as e:
            raise RegisterError(f"upload to {self.url} failed: {e}") from None
        if r.status_code not in (200, 201):
            raise self._fail(r, f"uploading the prompt of {self.name!r}")
        body = r.json()
        return {"task": self.name, "version": body.get("version"), "sha256": body.get("sha256")}
