from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.testmodel import make_test_model
from tests import pg


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random GPT-2 (2 layers, 128 wide, std 0.12) saved with save_pretrained + tokenizer."""
    return make_test_model(tmp_path_factory.mktemp("tiny-gpt2"), size="tiny", seed=0)


@pytest.fixture(params=pg.BACKENDS)
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database for this test, once per backend: a SQLite file in the test's
    tmp_path; a new PostgreSQL database (tests/pg.py: skipped, loudly, without
    POLYPROMPT_TEST_PG_URL). No tables: the test (or the registry it opens) migrates it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        with pg.fresh_database(request.node.name) as url:
            yield url


@pytest.fixture(scope="module", params=pg.BACKENDS)
def module_db_url(request, tmp_path_factory) -> Iterator[str]:
    """`db_url` shared by one module's tests (for a module-scoped app)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'registry.db'}"
    else:
        with pg.fresh_database(request.module.__name__.rsplit(".", 1)[-1]) as url:
            yield url


def pytest_report_header(config) -> str:
    url = pg.admin_url()
    if url is None:
        return f"postgresql: {pg.ENV} is not set, the PostgreSQL tests will be SKIPPED"
    from sqlalchemy.engine import make_url

    return f"postgresql: {make_url(url).render_as_string(hide_password=True)} ({pg.ENV})"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say it at the end, even under -q: how many PostgreSQL tests did not run, and why."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if pg.ENV in str(getattr(r, "longrepr", ""))]
    if skipped:
        terminalreporter.write_line(f"WARNING: {len(skipped)} PostgreSQL tests SKIPPED: {pg.SKIP_REASON}",
                                    yellow=True, bold=True)
