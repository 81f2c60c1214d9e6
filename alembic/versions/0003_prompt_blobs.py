"""prompt_blobs: the prompt bytes in the database, so that a replica needs only the database URL

Revision ID: 0003_prompt_blobs
Revises: 0002_task_chat_template
Create Date: 2026-12-01 00:00:00

Upgrade creates `prompt_blobs` (sha256 primary key, the canonical safetensors bytes, their size)
and imports the prompt file of every sha256 that `prompt_versions` references from the data
folder: `config.attributes["data_dir"]` (what `Registry.upgrade` passes), else `-x data_dir=...`,
else the `polyprompt.data_dir` main option, else `POLYPROMPT_DATA_DIR`, else (SQLite) the
database file's folder (the default layout keeps the database in the data folder). A file is
imported only if its bytes hash to its sha256. Files that are missing or corrupt are skipped with
a warning naming their tasks and versions: those version rows stay as they are, still served by
any replica whose own data folder holds the file intact, and refused (IntegrityError, the prompt
is "not in the database") by the others until the same prompt is uploaded again (which stores its
blob). Without a data folder at all nothing is imported (a warning says so). Offline (`--sql`):
only the table.

Downgrade drops the table; the files stay where they are (revision 0002 reads only them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

from alembic import context, op

revision: str = "0003_prompt_blobs"
down_revision: str | None = "0002_task_chat_template"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")
_SHA = re.compile(r"[0-9a-f]{64}")
_SHOWN = 10  # missing prompts named in the warning


def _data_dir(bind: sa.Connection) -> Path | None:
    cfg = context.config
    given = (cfg.attributes.get("data_dir")
             or context.get_x_argument(as_dictionary=True).get("data_dir")
             or cfg.get_main_option("polyprompt.data_dir")
             or os.environ.get("POLYPROMPT_DATA_DIR"))
    if given:
        return Path(given).expanduser()
    if bind.dialect.name == "sqlite" and bind.engine.url.database not in (None, "", ":memory:"):
        return Path(bind.engine.url.database).resolve().parent
    return None


def _import_files(bind: sa.Connection, blobs: sa.Table) -> None:
    rows = bind.execute(sa.text(
        "SELECT v.sha256, t.name, v.version FROM prompt_versions v JOIN tasks t ON t.id = v.task_id "
        "ORDER BY t.name, v.version")).all()
    users: dict[str, list[str]] = {}
    for sha, name, version in rows:
        users.setdefault(sha, []).append(f"{name} v{version}")
    if not users:
        return
    data_dir = _data_dir(bind)
    if data_dir is None:
        log.warning("0003: no data folder given (-x data_dir=... or POLYPROMPT_DATA_DIR): the %d prompt(s) of "
                    "%d version(s) were not imported into prompt_blobs; they are served only where a data "
                    "folder holds their files", len(users), len(rows))
        return
    imported, skipped = 0, []
    now = datetime.now(timezone.utc)
    for sha, who in users.items():
        data = None
        if _SHA.fullmatch(sha):
            try:
                data = (data_dir / "prompts" / sha[:2] / f"{sha}.safetensors").read_bytes()
            except OSError:
                data = None
            if data is not None and hashlib.sha256(data).hexdigest() != sha:
                data = None
        if data is None:
            skipped.append((sha, who))
            continue
        bind.execute(blobs.insert().values(sha256=sha, data=data, size=len(data), created_at=now))
        imported += 1
    log.info("0003: imported %d prompt file(s) from %s into prompt_blobs", imported, data_dir)
    if skipped:
        names = "; ".join(f"{sha[:12]} ({', '.join(who)})" for sha, who in skipped[:_SHOWN])
        more = f"; and {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
        log.warning("0003: %d prompt file(s) missing or corrupt in %s, not imported: %s%s. Their versions stay; "
                    "a replica serves them only from an intact local file until the prompt is uploaded again",
                    len(skipped), data_dir, names, more)


def upgrade() -> None:
    blobs = op.create_table(
        "prompt_blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_prompt_blobs")),
    )
    if op.get_context().as_sql:
        log.warning("0003: offline SQL creates prompt_blobs only; run the upgrade online to import the prompt files")
        return
    _import_files(op.get_bind(), blobs)


def downgrade() -> None:
    op.drop_table("prompt_blobs")
