"""Per-client limits shared by every replica, in PostgreSQL (the `LimitsBackend` of `SharedAdmission`).

- `key_rate`: one token bucket per client (RATE_LIMIT_PAGES_PER_MIN). Its row is locked (`FOR UPDATE`) by each
  admission of that client, so two replicas admitting the same client at once take turns; other clients do not wait.
- `key_inflight`: per replica and client, the pages admitted and not finished (KEY_MAX_PAGES_IN_FLIGHT), with a
  lease the replica renews. A killed replica's rows stop counting when their lease ends.
Times are the database server's (`clock_timestamp()`), so replicas' clocks need not agree.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from app.admission import Refusal, SharedRequest
from app.errors import StoreUnavailable

log = logging.getLogger(__name__)

_NOW = "extract(epoch FROM clock_timestamp())::float8"
RETRY_AFTER_S = 5


class PostgresLimits:
    """Shared rate buckets and pages in flight on the job store's connection pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool  # psycopg_pool.AsyncConnectionPool; the tables come from the store's migrations

    async def admit(self, request: SharedRequest) -> Refusal | None:
        try:
            async with self.pool.connection() as conn, conn.transaction():
                return await self._admit(conn, request)
        except psycopg.OperationalError as exc:  # the pool's timeout is one too
            raise _unavailable(exc) from None

    async def _admit(self, conn: Any, r: SharedRequest) -> Refusal | None:
        rate = float(r.rate or 0)
        await conn.execute(
            f"INSERT INTO key_rate (client, tokens, updated) VALUES (%s, %s, {_NOW}) ON CONFLICT DO NOTHING",
            (r.client, rate),
        )
        row = await (
            await conn.execute(
                f"SELECT tokens, updated, {_NOW} FROM key_rate WHERE client = %s FOR UPDATE", (r.client,)
            )
        ).fetchone()
        tokens, updated, now = row
        others = await (
            await conn.execute(
                "SELECT COALESCE(SUM(pages), 0) FROM key_inflight WHERE client = %s AND replica <> %s "
                "AND lease_until > %s",
                (r.client, r.replica, now),
            )
        ).fetchone()
        in_flight = int(others[0]) + r.mine
        if r.per_client is not None and in_flight and in_flight + r.pages > r.per_client:
            return Refusal(in_flight=in_flight)
        if r.rate is not None:
            tokens = min(rate, tokens + (now - updated) * rate / 60)
            needed = min(r.pages, r.rate)
            if r.charge_rate and tokens < needed:
                return Refusal(rate_wait_s=(needed - tokens) * 60 / rate)
            if r.charge_rate:
                tokens -= r.pages
            await conn.execute(
                "UPDATE key_rate SET tokens = %s, updated = %s WHERE client = %s", (tokens, now, r.client)
            )
        await conn.execute(
            "INSERT INTO key_inflight (replica, client, pages, lease_until) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (replica, client) DO UPDATE SET pages = EXCLUDED.pages, lease_until = EXCLUDED.lease_until",
            (r.replica, r.client, r.mine + r.pages, now + r.lease_s),
        )
        return None

    async def publish(self, replica: str, counts: dict[str, int], lease_s: float) -> None:
        try:
            async with self.pool.connection() as conn, conn.transaction():
                gone = [client for client, pages in counts.items() if pages <= 0]
                if gone:
                    await conn.execute(
                        "DELETE FROM key_inflight WHERE replica = %s AND client = ANY(%s)", (replica, gone)
                    )
                live = [(replica, client, pages, lease_s) for client, pages in counts.items() if pages > 0]
                if live:
                    async with conn.cursor() as cursor:
                        await cursor.executemany(
                            "INSERT INTO key_inflight (replica, client, pages, lease_until) "
                            f"VALUES (%s, %s, %s, {_NOW} + %s) ON CONFLICT (replica, client) "
                            "DO UPDATE SET pages = EXCLUDED.pages, lease_until = EXCLUDED.lease_until",
                            live,
                        )
                await conn.execute(
                    f"UPDATE key_inflight SET lease_until = {_NOW} + %s WHERE replica = %s", (lease_s, replica)
                )
                # Rows of replicas long dead: nobody renews them, so they only cost space.
                await conn.execute(f"DELETE FROM key_inflight WHERE lease_until < {_NOW} - 600")
        except psycopg.OperationalError as exc:  # the pool's timeout is one too
            raise _unavailable(exc) from None

    async def in_flight(self) -> dict[str, int]:
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    f"SELECT client, SUM(pages) FROM key_inflight WHERE lease_until > {_NOW} GROUP BY client"
                )
            ).fetchall()
        return {client: int(pages) for client, pages in rows}


def _unavailable(exc: Exception) -> StoreUnavailable:
    log.warning("shared limits: the job store is unreachable: %s", exc)
    return StoreUnavailable("the job store is unreachable; try again shortly", retry_after=RETRY_AFTER_S)
