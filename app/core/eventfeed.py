"""A job's record and events read with asyncio Redis, for Server-Sent Events.

A stream spends its life waiting on Redis. Waiting in a sync route would hold one of the server's worker threads
per open stream, the threads the sync routes share: a few dozen dashboards following jobs would stall every other
request. Awaiting holds none. The keys and their encoding are the job store's (`app/core/jobstore.py`)."""

from __future__ import annotations

from redis.asyncio import Redis

from app.core.jobstore import Event, JobRecord, event_from


class EventFeed:
    def __init__(self, redis: Redis):
        self.r = redis

    @classmethod
    def from_url(cls, url: str) -> EventFeed:
        return cls(Redis.from_url(url, decode_responses=True, health_check_interval=10, socket_connect_timeout=5,
                                  socket_timeout=30, retry_on_timeout=True))

    async def job(self, job_id: str) -> JobRecord | None:
        raw = await self.r.get(f"mf:job:{job_id}")
        return JobRecord.model_validate_json(raw) if raw else None

    async def events(self, job_id: str, after: str | None, limit: int) -> list[Event]:
        start = f"({after}" if after else "-"
        return [event_from(i, f) for i, f in await self.r.xrange(f"mf:events:{job_id}", start, "+", count=limit)]

    async def wait(self, job_id: str, after: str | None, block_ms: int = 15000) -> list[Event]:
        """Events after `after` as soon as there are any; none after `block_ms` of quiet."""
        reply = await self.r.xread({f"mf:events:{job_id}": after or "0-0"}, count=100, block=block_ms)
        return [event_from(i, f) for i, f in reply[0][1]] if reply else []
