"""The jobs of an order sent before an edit or rollback that Redis still holds: the edit waits for them.

An order's edits run in the order they were sent. PostgreSQL orders those it has seen (each is
registered by its first claim); this finds those it cannot have seen yet: a job still in the queue,
or taken by a replica that has not registered it yet (or died first). A queued job is in arq's queue with a
score no later than its enqueue time; a taken one is leased (worker/polling.py), its score before the claim
kept in the queue's leased scores. The jobs scored up to this edit's enqueue time in either are the
candidates; their enqueue time ("et") and, within one millisecond, their job ids say which were sent first.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from arq import ArqRedis
from arq.constants import job_key_prefix
from loguru import logger

from worker.client import JOB_FUNCTIONS, changes_in_queue, deserialize, sent_order
from worker.client import job_id as job_id_of_order
from worker.polling import original_scores_key

#: How many queued jobs ahead of an edit are looked at (a backlog longer than this is not read whole).
MAX_AHEAD = 1000


def _order_of(job: dict[str, Any]) -> Any:
    args, kwargs = job.get("a") or [], job.get("k") or {}
    return args[0] if args else kwargs.get("order_id")


async def jobs_ahead(
    redis: ArqRedis, queue: str, order_id: int, job_id: str, enqueued_at: datetime | None
) -> list[str]:
    """The ids of the order's jobs (any kind) sent before job `job_id`, which was enqueued at `enqueued_at`."""
    if enqueued_at is None:
        return []
    mine = round(enqueued_at.timestamp() * 1000)
    # A job a replica took is leased: its score in the queue is its lease's end, and its own score (when it
    # was due) is kept in the leased scores (worker/polling.py; a hash, job id -> score, as long as the
    # replicas run jobs at once) until it ends. A job retried with a delay before it was registered (its
    # claim could not reach PostgreSQL) is scored at its retry: the order's edits and rollbacks are also
    # found by their ids (`<function>:<order_id>:<key>`), whatever their score, and its generate_site job.
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(queue, "-inf", mine, 0, MAX_AHEAD)
        pipe.hgetall(original_scores_key(queue))
        queued, leased = await pipe.execute()
    taken = [i for i, score in leased.items() if float(score) <= mine]
    changes = [job async for job in changes_in_queue(redis, order_id, queue_name=queue)]
    seen = dict.fromkeys(
        i.decode() if isinstance(i, bytes) else i for i in [*queued, *taken, *changes, job_id_of_order(order_id)]
    )
    ids = [i for i in seen if i != job_id][:MAX_AHEAD]
    if not ids:
        return []
    ahead: list[str] = []
    for other, data in zip(ids, await redis.mget([job_key_prefix + i for i in ids]), strict=True):
        if data is None:
            continue
        try:
            job = deserialize(data)
        except ValueError:
            logger.warning("job {} in the queue is not JSON: not taken for one of order {}", other, order_id)
            continue
        if not isinstance(job, dict) or job.get("f") not in JOB_FUNCTIONS or _order_of(job) != order_id:
            continue
        sent = job.get("et")
        if isinstance(sent, int | float) and (sent, sent_order(other)) < (mine, sent_order(job_id)):
            ahead.append(other)
    return ahead
