"""Keyword-only store functions over a SQLAlchemy Session.

Every mutation bumps `registry_state.generation` as its *first* statement, in the
caller's transaction: on SQLite that takes the write lock up front (no lock-upgrade
deadlocks), on PostgreSQL the row lock serialises mutations, and the bump also queues a
`NOTIFY polyprompt_registry` (sent when, and only if, the transaction commits) so that
servers listening on the channel reload at once instead of at their next poll.

Prompt bytes live in `prompt_blobs`, one row per sha256, written with the first version row
that references them and deleted with the last (`put_blob`, `delete_task`).
"""

from __future__ import annotations

from datetime import timezone
from typing import Any

from sqlalchemy import delete, exc, func, insert, select, text, update
from sqlalchemy.orm import Session, joinedload, selectinload

from common import TASK_NAME_RE, sha256_bytes

from .errors import IntegrityError, InvalidName, InvalidPrompt, TaskExists, TaskNotFound, VersionNotFound
from .models import PromptBlob, PromptVersion, RegistryState, Task, utcnow

STATE_ID = 1
# the PostgreSQL channel every generation bump notifies (payload: the new generation)
NOTIFY_CHANNEL = "polyprompt_registry"
# The most virtual tokens a task's prompt may have: the one cap, for a task created over HTTP
# (`TaskCreate`) and for every prompt stored by any path (uploads, `tasks import`, training),
# checked here where every path ends, before a file is written or a row inserted.
MAX_VIRTUAL_TOKENS = 512
MAX_CHAT_TEMPLATE_CHARS = 65536
_UNSET: Any = object()


def validate_name(name: str) -> str:
    """Return `name` if it is a valid task name, else raise InvalidName."""
    if not isinstance(name, str) or TASK_NAME_RE.fullmatch(name) is None:
        raise InvalidName(
            f"invalid task name {name!r}: use 1-64 characters of a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def check_virtual_tokens(n: int) -> int:
    """Return `n` if a prompt may have that many virtual tokens (1..MAX_VIRTUAL_TOKENS), else
    raise InvalidPrompt saying so."""
    if n < 1:
        raise InvalidPrompt("a prompt needs at least one virtual token")
    if n > MAX_VIRTUAL_TOKENS:
        raise InvalidPrompt(f"the prompt has {n} virtual tokens, over the maximum of {MAX_VIRTUAL_TOKENS} "
                            "(the limit a task is created with); use fewer virtual tokens")
    return n


def check_chat_template(template: str | None) -> str | None:
    """Return `template` if the registry can store it (None, or a non-empty string of at most
    MAX_CHAT_TEMPLATE_CHARS characters without NUL), else raise ValueError. Whether it is a
    Jinja template that renders is the server's to check (the registry has no Jinja)."""
    if template is None:
        return None
    if not isinstance(template, str):
        raise ValueError(f"chat_template must be a string or None, not {type(template).__name__}")
    if not template:
        raise ValueError("chat_template must not be empty (None means: the server's template)")
    if len(template) > MAX_CHAT_TEMPLATE_CHARS:
        raise ValueError(f"chat_template is {len(template)} characters, over the {MAX_CHAT_TEMPLATE_CHARS} limit")
    if "\x00" in template:
        raise ValueError("chat_template must not contain NUL characters")
    return template


def bump_generation(session: Session) -> int:
    """Increment the registry generation (on PostgreSQL also queue its NOTIFY); returns the new value."""
    res = session.execute(
        update(RegistryState)
        .where(RegistryState.id == STATE_ID)
        .values(generation=RegistryState.generation + 1)
    )
    if res.rowcount == 0:  # schema created without the migration's seed row
        session.add(RegistryState(id=STATE_ID, generation=1))
        session.flush()
        gen = 1
    else:
        gen = int(session.scalar(select(RegistryState.generation).where(RegistryState.id == STATE_ID)))
    notify(session, gen)
    return gen


def notify(session: Session, generation: int) -> None:
    """PostgreSQL: `pg_notify(NOTIFY_CHANNEL, generation)` in the session's transaction (delivered
    to the listeners at commit, dropped on rollback). Other databases: nothing (servers poll)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, :payload)"),
                        {"channel": NOTIFY_CHANNEL, "payload": str(generation)})


def get_generation(session: Session) -> int:
    """The current registry generation (0 if never mutated)."""
    gen = session.scalar(select(RegistryState.generation).where(RegistryState.id == STATE_ID))
    return int(gen or 0)


def get_task(session: Session, *, name: str) -> Task:
    """The task called `name` (versions eagerly loaded); raises TaskNotFound."""
    stmt = select(Task).where(Task.name == name).options(joinedload(Task.versions))
    task = session.scalars(stmt).unique().one_or_none()
    if task is None:
        raise TaskNotFound(f"task {name!r} not found")
    return task


def task_exists(session: Session, *, name: str) -> bool:
    """Whether a task called `name` exists (one indexed lookup, nothing loaded)."""
    return session.scalar(select(Task.id).where(Task.name == name)) is not None


def list_tasks(session: Session) -> list[Task]:
    """All tasks ordered by name, versions eagerly loaded (one query)."""
    stmt = select(Task).options(joinedload(Task.versions)).order_by(Task.name)
    return list(session.scalars(stmt).unique().all())


def _task_filter(q: str | None):
    """The WHERE clause of a case-insensitive substring search on name or description (LIKE's
    wildcards in `q` are escaped: searching "5%" finds "5%", not everything starting with 5)."""
    if not q:
        return None
    return Task.name.icontains(q, autoescape=True) | Task.description.icontains(q, autoescape=True)


def count_tasks(session: Session, *, q: str | None = None) -> int:
    """How many tasks match `q` (all of them without it): one COUNT, nothing loaded."""
    stmt = select(func.count(Task.id))
    if (cond := _task_filter(q)) is not None:
        stmt = stmt.where(cond)
    return int(session.scalar(stmt) or 0)


def list_tasks_page(session: Session, *, limit: int, offset: int = 0, q: str | None = None) -> list[Task]:
    """One page of the tasks matching `q`, ordered by name, versions loaded for that page only: the
    database does the filtering and paging, so a console showing 50 of 10,000 tasks reads 50.
    (selectinload, not joinedload: a joined eager load would make LIMIT count version rows.)"""
    stmt = select(Task).options(selectinload(Task.versions)).order_by(Task.name)
    if (cond := _task_filter(q)) is not None:
        stmt = stmt.where(cond)
    return list(session.scalars(stmt.limit(limit).offset(offset)).all())


def serving_index(session: Session) -> dict[str, tuple[int, int | None, str | None, str | None]]:
    """`{name: (num_virtual_tokens, active version, its sha256, chat template)}` for every task,
    one query, no ORM objects: all a server holds per task to route requests (fast at 10,000
    tasks; template None: the server's). Equal templates come back as one string object."""
    stmt = (
        select(Task.name, Task.num_virtual_tokens, PromptVersion.version, PromptVersion.sha256, Task.chat_template)
        .outerjoin(PromptVersion, (PromptVersion.task_id == Task.id) & PromptVersion.is_active)
    )
    shared: dict[str, str] = {}
    return {name: (n, version, sha, None if tpl is None else shared.setdefault(tpl, tpl))
            for name, n, version, sha, tpl in session.execute(stmt)}


def created_times(session: Session, *, name: str | None = None) -> dict[str, int]:
    """`{name: creation time, unix seconds}` for every task (or the one called `name`): one
    two-column query, no ORM objects, for `/v1/models` (`created`) at thousands of tasks."""
    stmt = select(Task.name, Task.created_at)
    if name is not None:
        stmt = stmt.where(Task.name == name)
    out = {}
    for n, dt in session.execute(stmt):
        if dt.tzinfo is None:  # SQLite drops the zone; we always store UTC
            dt = dt.replace(tzinfo=timezone.utc)
        out[n] = int(dt.timestamp())
    return out


def create_task(
    session: Session,
    *,
    name: str,
    description: str = "",
    num_virtual_tokens: int,
    hidden_size: int,
    base_model: str,
    chat_template: str | None = None,
) -> Task:
    """Insert a new task; raises InvalidName / TaskExists / InvalidPrompt (sizes out of range) /
    ValueError (a chat template that cannot be stored)."""
    validate_name(name)
    if hidden_size < 1:
        raise InvalidPrompt("hidden_size must be positive")
    check_virtual_tokens(num_virtual_tokens)
    check_chat_template(chat_template)
    bump_generation(session)
    if task_exists(session, name=name):
        raise TaskExists(f"task {name!r} already exists")
    now = utcnow()
    task = Task(
        name=name,
        description=description or "",
        num_virtual_tokens=num_virtual_tokens,
        hidden_size=hidden_size,
        base_model=base_model,
        chat_template=chat_template,
        created_at=now,
        updated_at=now,
    )
    session.add(task)
    try:
        session.flush()
    except exc.IntegrityError:
        raise TaskExists(f"task {name!r} already exists") from None
    return task


def update_task(session: Session, *, name: str, chat_template: str | None = _UNSET) -> Task:
    """Change the task's settings given (today: its chat template; None = the server's); with
    none given, nothing is written and the generation stays. Raises TaskNotFound / ValueError."""
    if chat_template is _UNSET:
        return get_task(session, name=name)
    check_chat_template(chat_template)
    bump_generation(session)
    task = get_task(session, name=name)
    task.chat_template = chat_template
    task.updated_at = utcnow()
    session.flush()
    return task


def delete_task(session: Session, *, name: str) -> list[str]:
    """Delete a task, (by cascade) its versions, and the prompt blobs no other version references
    any more; returns those blobs' sha256s. Local cache files are left in place."""
    bump_generation(session)
    task = get_task(session, name=name)
    shas = sorted({v.sha256 for v in task.versions})
    session.delete(task)
    session.flush()
    return delete_orphan_blobs(session, shas)


def delete_orphan_blobs(session: Session, shas: list[str]) -> list[str]:
    """Delete the blobs among `shas` that no version references; returns their sha256s. Call it
    after a bump in the same transaction: mutations are serialised, so no version can start
    referencing one of them between the check and the delete."""
    if not shas:
        return []
    still = set(session.scalars(select(PromptVersion.sha256).where(PromptVersion.sha256.in_(shas)).distinct()))
    orphans = [sha for sha in shas if sha not in still]
    if orphans:
        session.execute(delete(PromptBlob).where(PromptBlob.sha256.in_(orphans)))
    return orphans


def put_blob(session: Session, *, sha256: str, data: bytes) -> bool:
    """Store `data` as the blob of `sha256` unless it is there (content-addressed: once per
    content); a stored blob whose bytes no longer match is rewritten. Returns whether a row was
    written. Raises IntegrityError if `data` does not hash to `sha256`."""
    actual = sha256_bytes(data)
    if actual != sha256:
        raise IntegrityError(f"prompt bytes hash to {actual}, not {sha256}")
    stored = session.scalar(select(PromptBlob.data).where(PromptBlob.sha256 == sha256))
    if stored is None:
        session.execute(insert(PromptBlob).values(sha256=sha256, data=data, size=len(data), created_at=utcnow()))
        return True
    if sha256_bytes(bytes(stored)) != sha256:  # damaged in the database: the good bytes replace it
        session.execute(update(PromptBlob).where(PromptBlob.sha256 == sha256).values(data=data, size=len(data)))
        return True
    return False


def get_blob(session: Session, *, sha256: str) -> bytes | None:
    """The stored bytes of `sha256`, verified; None if the database has no such blob. Raises
    IntegrityError if the stored bytes do not hash to `sha256`."""
    data = session.scalar(select(PromptBlob.data).where(PromptBlob.sha256 == sha256))
    if data is None:
        return None
    data = bytes(data)
    actual = sha256_bytes(data)
    if actual != sha256:
        raise IntegrityError(f"prompt blob {sha256} is corrupt in the database: sha256 {actual}")
    return data


def blob_shas(session: Session) -> set[str]:
    """The sha256 of every stored blob (one light query)."""
    return set(session.scalars(select(PromptBlob.sha256)))


def _set_active(session: Session, task: Task, pv: PromptVersion) -> None:
    # deactivate first (flushed) so the one-active partial unique index never trips
    session.execute(
        update(PromptVersion)
        .where(PromptVersion.task_id == task.id, PromptVersion.id != pv.id)
        .values(is_active=False)
        .execution_options(synchronize_session="fetch")
    )
    pv.is_active = True
    task.num_virtual_tokens = pv.num_virtual_tokens
    task.updated_at = utcnow()
    session.flush()


def add_version(
    session: Session,
    *,
    name: str,
    sha256: str,
    path: str,
    num_virtual_tokens: int,
    hidden_size: int,
    source: str,
    meta: dict[str, Any] | None = None,
    activate: bool = True,
    base_model: str | None = None,
    data: bytes | None = None,
) -> PromptVersion:
    """Add version max+1 of task `name`. The first version is always activated. `data`: the
    prompt's bytes, stored as its blob if the database has none yet (`put_blob`)."""
    bump_generation(session)
    task = get_task(session, name=name)
    return insert_version(
        session,
        task=task,
        sha256=sha256,
        path=path,
        num_virtual_tokens=num_virtual_tokens,
        hidden_size=hidden_size,
        source=source,
        meta=meta,
        activate=activate,
        base_model=base_model,
        data=data,
    )


def insert_version(
    session: Session,
    *,
    task: Task,
    sha256: str,
    path: str,
    num_virtual_tokens: int,
    hidden_size: int,
    source: str,
    meta: dict[str, Any] | None = None,
    activate: bool = True,
    base_model: str | None = None,
    data: bytes | None = None,
) -> PromptVersion:
    """Add version max+1 of `task` *without* bumping the generation: the building block of a
    mutation that already bumped it in this transaction (add_version; a task created with its
    first version). The first version is always activated. `data`: the prompt's bytes, stored
    as its blob in the same transaction (`put_blob`: checked against `sha256`)."""
    if hidden_size != task.hidden_size:
        raise InvalidPrompt(
            f"hidden size {hidden_size} != task {task.name!r}'s {task.hidden_size}"
        )
    check_virtual_tokens(num_virtual_tokens)
    last = session.scalar(select(func.max(PromptVersion.version)).where(PromptVersion.task_id == task.id))
    has_active = any(v.is_active for v in task.versions)
    pv = PromptVersion(
        task_id=task.id,
        version=(last or 0) + 1,
        is_active=False,
        sha256=sha256,
        path=path,
        num_virtual_tokens=num_virtual_tokens,
        hidden_size=hidden_size,
        base_model=base_model or task.base_model,
        source=source,
        meta=dict(meta or {}),
        created_at=utcnow(),
    )
    task.versions.append(pv)
    session.flush()
    if data is not None:
        put_blob(session, sha256=sha256, data=data)
    if activate or not has_active:
        _set_active(session, task, pv)
    else:
        task.updated_at = utcnow()
        session.flush()
    return pv


def activate_version(session: Session, *, name: str, version: int) -> PromptVersion:
    """Make `version` the task's only active version; raises VersionNotFound."""
    bump_generation(session)
    task = get_task(session, name=name)
    pv = next((v for v in task.versions if v.version == version), None)
    if pv is None:
        have = [v.version for v in task.versions]
        raise VersionNotFound(f"task {name!r} has no version {version} (versions: {have})")
    _set_active(session, task, pv)
    return pv
