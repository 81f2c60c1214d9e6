"""Task / soft-prompt registry: SQLAlchemy tables, content-addressed files, a facade."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from . import store, views
from .errors import (
    IntegrityError,
    InvalidName,
    InvalidPrompt,
    RegistryError,
    TaskExists,
    TaskNotFound,
    VersionNotFound,
)
from .listen import ChangeListener
from .paths import alembic_dir, repo_root
from .store import MAX_CHAT_TEMPLATE_CHARS, MAX_VIRTUAL_TOKENS, NOTIFY_CHANNEL

if TYPE_CHECKING:  # torch and safetensors load on first use: `polyprompt tasks list` needs neither
    import torch

__all__ = [
    "Registry",
    "RegistryError",
    "TaskNotFound",
    "TaskExists",
    "VersionNotFound",
    "InvalidName",
    "InvalidPrompt",
    "IntegrityError",
    "ChangeListener",
    "NOTIFY_CHANNEL",
    "make_engine",
    "migration_lock",
    "alembic_config",
    "MAX_VIRTUAL_TOKENS",
    "MAX_CHAT_TEMPLATE_CHARS",
]

# arbitrary constant key for pg_advisory_lock around migrations ("polyprmt")
_PG_MIGRATION_LOCK = 0x706F6C7970726D74
SQLITE_BUSY_TIMEOUT_MS = 30_000
# alembic's `context` and `op` are module globals: one migration at a time per process, whatever the database
_MIGRATING = threading.Lock()
log = logging.getLogger("polyprompt.registry")


PG_CONNECT_TIMEOUT_S = 5


def make_engine(db_url: str) -> Engine:
    """An Engine for `db_url`; SQLite gets foreign keys, WAL and a busy timeout. A plain
    `postgresql://` (or `postgres://`) URL uses psycopg 3, the driver the project depends on
    (SQLAlchemy's own default for it is psycopg2)."""
    url = make_url(db_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() != "sqlite":
        # a stale pooled connection (the server restarted) is replaced, not an error; an
        # unreachable server fails within seconds (admin writes answer 503), never hangs
        args = {"connect_timeout": PG_CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
        return create_engine(url, pool_pre_ping=True, connect_args=args)
    memory = url.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {
        "connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    }
    if memory:
        kwargs["poolclass"] = StaticPool
    else:
        Path(url.database).resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    return engine


@contextmanager
def migration_lock(conn: Connection) -> Iterator[None]:
    """Hold the database's migration lock on `conn` for the block, so that processes migrating one
    database at the same moment (replicas starting together on an empty one) take turns: the first
    migrates, the others find it at head. PostgreSQL: a session-level `pg_advisory_lock` on a fixed
    key, released after the block (or when the connection dies). SQLite: its write lock
    (`BEGIN IMMEDIATE`, waiting up to the busy timeout), held until the caller commits, so the
    block runs in that one transaction (SQLite's DDL is transactional). Other databases: none."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        conn.commit()
        try:
            yield
        finally:
            conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
    else:
        if dialect == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield


def alembic_config(db_url: str | None = None, data_dir: str | os.PathLike[str] | None = None):
    """An alembic Config (alembic.config.Config) for `<repo root>/alembic.ini`, independent of the
    CWD. `data_dir`: the data folder whose prompt files revision 0003 imports into the database
    (`attributes["data_dir"]`; the `alembic` command takes `-x data_dir=...`)."""
    from alembic.config import Config

    ini = repo_root() / "alembic.ini"
    cfg = Config(str(ini)) if ini.is_file() else Config()
    cfg.set_main_option("script_location", str(alembic_dir()))
    if db_url is not None:
        cfg.attributes["url"] = db_url
    if data_dir is not None:
        cfg.attributes["data_dir"] = str(data_dir)
    return cfg


def _prompt_shape(embeddings: Any) -> tuple[int, int]:
    """(n, hidden) of a prompt tensor; raises InvalidPrompt unless it is 2-D with 1 <= n <=
    MAX_VIRTUAL_TOKENS (checked before any file is written)."""
    import torch

    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        shape = tuple(getattr(embeddings, "shape", ()))
        raise InvalidPrompt(f"embeddings must be a 2-D tensor [n, hidden], got shape {shape}")
    n, hidden = (int(d) for d in embeddings.shape)
    store.check_virtual_tokens(n)
    return n, hidden


class Registry:
    """Thread-safe facade: one Engine; every method is its own session/transaction.

    Returns plain dicts, never ORM objects.
    """

    def __init__(self, db_url: str, data_dir: str | os.PathLike[str]) -> None:
        self.db_url = db_url
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(db_url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Registry({self.engine.url.render_as_string(hide_password=True)!r}, {str(self.data_dir)!r})"

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()

    def _session(self) -> Session:
        return self._sessions()

    # -- schema -------------------------------------------------------------
    def upgrade(self, revision: str = "head") -> None:
        """`alembic upgrade head` on this database, under `migration_lock` (an advisory lock on
        PostgreSQL, the write lock on SQLite) and one migration at a time in this process: any
        number of servers and tools opening one database at once migrate it once."""
        from alembic import command

        cfg = alembic_config(self.db_url, self.data_dir)  # 0003 imports the prompt files found there
        with _MIGRATING, self.engine.connect() as conn, migration_lock(conn):
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()

    # -- reads ---------------------------------------------------------------
    def generation(self) -> int:
        """Counter bumped by every mutation; poll it to hot-reload."""
        with self._session() as s:
            return store.get_generation(s)

    def get_task(self, name: str) -> dict[str, Any]:
        """The task as a dict; raises TaskNotFound."""
        with self._session() as s:
            return views.task_to_dict(store.get_task(s, name=name))

    def list_tasks(self) -> list[dict[str, Any]]:
        """All tasks (ordered by name)."""
        with self._session() as s:
            return [views.task_to_dict(t) for t in store.list_tasks(s)]

    def list_tasks_page(self, *, limit: int, offset: int = 0, q: str | None = None
                        ) -> tuple[list[dict[str, Any]], int]:
        """One page of tasks matching `q` (substring of name or description, any case), ordered by
        name, and how many match in all; both read in one session, so they agree."""
        with self._session() as s:
            page = store.list_tasks_page(s, limit=limit, offset=offset, q=q)
            return [views.task_to_dict(t) for t in page], store.count_tasks(s, q=q)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """`{name: task dict}` for every task, with active version info, in one query."""
        return {t["name"]: t for t in self.list_tasks()}

    def active_index(self) -> dict[str, tuple[int, int | None, str | None]]:
        """`{name: (num_virtual_tokens, active version, sha256)}`: `serving_index` without templates."""
        return {name: v[:3] for name, v in self.serving_index().items()}

    def serving_index(self) -> dict[str, tuple[int, int | None, str | None, str | None]]:
        """`{name: (num_virtual_tokens, active version, sha256, chat_template)}`, one light query:
        what a server holds per task (chat_template None: the server's own)."""
        with self._session() as s:
            return store.serving_index(s)

    def created_times(self, name: str | None = None) -> dict[str, int]:
        """`{name: creation time in unix seconds}` for every task (or just `name`), one light query."""
        with self._session() as s:
            return store.created_times(s, name=name)

    def load_prompt(self, sha256: str) -> torch.Tensor:
        """The stored prompt `[n, hidden]` float32, sha256-verified. The data folder is this
        replica's cache: its file is used if it is there and its sha256 matches; else (missing,
        corrupt) the blob is read from the database, verified, written to the folder atomically
        (the cache repaired; a folder that cannot be written only logs a warning) and returned.
        Raises IntegrityError if neither holds the prompt intact."""
        from .files import prompt_from_bytes, prompt_relpath, read_prompt_bytes, write_bytes_atomic

        rel = prompt_relpath(sha256)  # validates the digest's form
        try:
            return prompt_from_bytes(read_prompt_bytes(self.data_dir, sha256), f"prompt file {rel}")
        except IntegrityError as e:
            local = str(e)
        with self._session() as s:
            data = store.get_blob(s, sha256=sha256)  # verified; IntegrityError if corrupt there
        if data is None:
            raise IntegrityError(f"prompt {sha256} is not in the database, and {local}")
        if "corrupt" in local:
            log.warning("%s: replaced by the database's copy", local)
        try:
            write_bytes_atomic(self.data_dir / rel, data)
        except OSError as e:
            log.warning("could not cache prompt %s in %s: %s", sha256, self.data_dir, e)
        return prompt_from_bytes(data, f"prompt blob {sha256}")

    def blob_shas(self) -> set[str]:
        """The sha256 of every prompt blob the database holds."""
        with self._session() as s:
            return store.blob_shas(s)

    def listen(self, on_change: Any) -> ChangeListener | None:
        """PostgreSQL: a started `ChangeListener` calling `on_change()` on every committed change
        (and after each (re)connection); other databases: None (poll `generation()`)."""
        if self.engine.dialect.name != "postgresql":
            return None
        return ChangeListener(self.engine.url, on_change).start()

    # -- mutations -----------------------------------------------------------
    def create_task(
        self,
        name: str,
        *,
        description: str = "",
        num_virtual_tokens: int | None = None,
        hidden_size: int | None = None,
        base_model: str,
        embeddings: torch.Tensor | None = None,
        source: str = "create",
        meta: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> dict[str, Any]:
        """Create a task; with `embeddings` [n, hidden] also its active version 1, atomically:
        the prompt file is written first, then one transaction inserts both rows, so nobody
        (not even a crash in between) ever sees the task without a prompt. Without
        `embeddings` the task has no versions yet. `chat_template`: the task's own Jinja chat
        template (None: the server's; the caller checks that it renders). Raises TaskExists /
        InvalidName / InvalidPrompt (also over MAX_VIRTUAL_TOKENS) / ValueError (a template that
        cannot be stored), all before anything is written."""
        store.check_chat_template(chat_template)
        file: tuple[str, str] | None = None
        data: bytes | None = None
        if embeddings is not None:
            n, hidden = _prompt_shape(embeddings)
            if num_virtual_tokens not in (None, n) or hidden_size not in (None, hidden):
                raise InvalidPrompt(f"embeddings are [{n}, {hidden}] but num_virtual_tokens={num_virtual_tokens}, "
                                    f"hidden_size={hidden_size} were asked for")
            num_virtual_tokens, hidden_size = n, hidden
            store.validate_name(name)
            with self._session() as s:  # fail fast before writing a file (the insert checks again)
                if store.task_exists(s, name=name):
                    raise TaskExists(f"task {name!r} already exists")
            from .files import prompt_bytes, write_prompt_file

            data = prompt_bytes(embeddings)
            file = write_prompt_file(self.data_dir, data)  # this replica's cache; the blob goes in below
        elif num_virtual_tokens is None or hidden_size is None:
            raise InvalidPrompt("a task without embeddings needs num_virtual_tokens and hidden_size")
        with self._session() as s, s.begin():
            task = store.create_task(
                s,
                name=name,
                description=description,
                num_virtual_tokens=num_virtual_tokens,
                hidden_size=hidden_size,
                base_model=base_model,
                chat_template=chat_template,
            )
            if file is not None:
                store.insert_version(
                    s,
                    task=task,
                    sha256=file[0],
                    path=file[1],
                    num_virtual_tokens=num_virtual_tokens,
                    hidden_size=hidden_size,
                    source=source,
                    meta=meta,
                    data=data,
                )
            return views.task_to_dict(task)

    def update_task(self, name: str, *, chat_template: str | None = store._UNSET) -> dict[str, Any]:
        """Change the task's settings that are passed (today only `chat_template`; None: back to
        the server's) and return the task; nothing passed: nothing written. Raises TaskNotFound /
        ValueError (a template that cannot be stored; the caller checks that it renders)."""
        with self._session() as s, s.begin():
            return views.task_to_dict(store.update_task(s, name=name, chat_template=chat_template))

    def delete_task(self, name: str) -> None:
        """Delete the task's rows and, in the same transaction, the prompt blobs no other version
        references. Local cache files stay (content-addressed: harmless, reused if the same
        prompt comes back)."""
        with self._session() as s, s.begin():
            store.delete_task(s, name=name)

    def add_version(
        self,
        name: str,
        embeddings: torch.Tensor,
        *,
        source: str,
        meta: dict[str, Any] | None = None,
        activate: bool = True,
        base_model: str | None = None,
    ) -> dict[str, Any]:
        """Store `embeddings` [n, hidden] as the task's next version (file first, then row)."""
        n, hidden = _prompt_shape(embeddings)
        with self._session() as s:  # fail fast before writing a file
            task = store.get_task(s, name=name)
            if task.hidden_size != hidden:
                raise InvalidPrompt(f"hidden size {hidden} != task {name!r}'s {task.hidden_size}")
        from .files import prompt_bytes, write_prompt_file

        data = prompt_bytes(embeddings)
        sha, rel = write_prompt_file(self.data_dir, data)  # this replica's cache; the blob goes in below
        with self._session() as s, s.begin():
            pv = store.add_version(
                s,
                name=name,
                sha256=sha,
                path=rel,
                num_virtual_tokens=n,
                hidden_size=hidden,
                source=source,
                meta=meta,
                activate=activate,
                base_model=base_model,
                data=data,
            )
            return views.version_to_dict(pv)

    def activate_version(self, name: str, version: int) -> dict[str, Any]:
        """Make `version` the active one; raises TaskNotFound / VersionNotFound."""
        with self._session() as s, s.begin():
            return views.version_to_dict(store.activate_version(s, name=name, version=int(version)))
