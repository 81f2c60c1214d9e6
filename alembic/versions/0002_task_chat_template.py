"""tasks.chat_template: a task's own Jinja chat template (nullable; NULL = the server's)

Revision ID: 0002_task_chat_template
Revises: 0001_initial
Create Date: 2025-06-01 00:00:00

Both directions keep every task and version. The column is added and dropped in place
(`ALTER TABLE`), never by batch mode's copy-and-rename: on SQLite that drops `tasks`, and with
foreign keys on, dropping it cascades into `prompt_versions`. SQLite older than 3.35 has no
`DROP COLUMN`; there the downgrade leaves the (nullable, unread) column, and the upgrade adds
it only where it is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002_task_chat_template"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")


def _has_column() -> bool:
    bind = op.get_bind()
    return "chat_template" in {c["name"] for c in sa.inspect(bind).get_columns("tasks")}


def upgrade() -> None:
    if op.get_context().as_sql or not _has_column():  # offline SQL: the plain statement
        op.add_column("tasks", sa.Column("chat_template", sa.Text(), nullable=True))


def downgrade() -> None:
    bind = None if op.get_context().as_sql else op.get_bind()
    if bind is not None and bind.dialect.name == "sqlite" and bind.dialect.dbapi.sqlite_version_info < (3, 35):
        log.warning("SQLite %s has no DROP COLUMN: tasks.chat_template stays (unused by revision 0001)",
                    bind.dialect.dbapi.sqlite_version)
        return
    op.drop_column("tasks", "chat_template")
