"""The throwaway PostgreSQL fixture: a real server, a fresh database per test, password auth on loopback."""

from __future__ import annotations

import psycopg
import pytest

from tests.support.postgres import PASSWORD, PostgresServer


def test_each_test_gets_its_own_empty_database(postgres_server: PostgresServer, postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE mine (x int)")
        assert conn.execute("SELECT current_database()").fetchone() == (postgres_url.rsplit("/", 1)[1],)
    other = postgres_server.create_database()
    try:
        with psycopg.connect(other) as conn:
            tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'mine'").fetchone()
            assert tables == (0,)
    finally:
        postgres_server.drop_database(other)


def test_the_server_wants_the_password(postgres_server: PostgresServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(postgres_server.url(password=False).replace("@", ":wrong@"), connect_timeout=5)
    assert PASSWORD in postgres_server.url()
