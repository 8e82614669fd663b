"""Enqueueing generations from Python: the JSON serializer, the queue and the job id, in one place.

    from worker.client import connect, enqueue_generation
    redis = await connect("redis://localhost:6379/0")
    await enqueue_generation(redis, order_id=42, brief={"business_name": "...", "description": "..."})

Jobs are JSON, never pickle: a pickled payload in Redis would run code for anyone who can write
to Redis, so the worker refuses them.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import redis.asyncio.connection as redis_connection
from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from arq.constants import result_key_prefix
from arq.jobs import Job

from worker.models import Brief

QUEUE_NAME = "site_generation"
JOB_FUNCTION = "generate_site"

#: The defaults of `connect` and of the settings `redis.socket_timeout_s` and `redis.connect_timeout_s`.
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0

#: TCP keepalive of every connection to Redis: an idle connection to a host that vanished is found dead after
#: about 10 + 3 * 3 s instead of hours. (A connection that waits for an answer is bounded by the socket timeout.)
KEEPALIVE = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
}


class NotJSON(ValueError):
    pass


def _encode(value: Any) -> Any:
    # A failed job's result is its exception: store what a reader needs instead of failing to.
    if isinstance(value, BaseException):
        cause = value.__cause__ or value.__context__
        return {
            "error": type(value).__name__,
            "message": str(value) or repr(value),
            **({"cause": f"{type(cause).__name__}: {cause}"} if cause else {}),
        }
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def serialize(data: Any) -> bytes:
    return json.dumps(data, default=_encode, separators=(",", ":")).encode()


def deserialize(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = " (it looks like pickle)" if payload[:1] == b"\x80" else ""
        raise NotJSON(
            f"job payload is not JSON{hint}: sitegen-worker only runs JSON jobs; enqueue with "
            "arq.create_pool(..., job_serializer=..., job_deserializer=...) as the README shows"
        ) from exc


def job_id(order_id: int) -> str:
    """One job id per order: arq drops a second enqueue while the first is queued or running."""
    return f"{JOB_FUNCTION}:{order_id}"


async def connect(
    redis_url: str, *, socket_timeout_s: float = SOCKET_TIMEOUT_S, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> ArqRedis:
    """An arq Redis pool that speaks the worker's JSON serializer, every command bounded (see `bound`)."""
    settings = RedisSettings.from_dsn(redis_url)
    settings.conn_timeout = connect_timeout_s  # type: ignore[assignment]  # arq passes it on as is
    redis = await create_pool(
        settings,
        job_serializer=serialize,
        job_deserializer=deserialize,
        default_queue_name=QUEUE_NAME,
    )
    return bound(redis, socket_timeout_s=socket_timeout_s, connect_timeout_s=connect_timeout_s)


def bound(redis: ArqRedis, *, socket_timeout_s: float, connect_timeout_s: float) -> ArqRedis:
    """Give every connection of `redis`'s pool, open or to come, a socket timeout and TCP keepalive.

    arq's pool sets only a connect timeout (arq 0.28 passes no other socket option on), so a command whose
    answer never comes (a partition, a host gone without a reset) would wait on its socket for ever: here it
    raises `redis.exceptions.TimeoutError` after `socket_timeout_s` and its connection is dropped, which every
    caller of the worker treats as Redis out of reach (worker/redis_outage.py). No command of the worker
    blocks in Redis (no BLPOP, no XREAD BLOCK), so no answer legitimately takes that long.
    """
    pool = redis.connection_pool
    options: dict[str, Any] = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": connect_timeout_s}
    if issubclass(pool.connection_class, redis_connection.Connection):  # TCP (and TLS); not a unix socket
        options.update(socket_keepalive=True, socket_keepalive_options=KEEPALIVE)
    pool.connection_kwargs.update(options)
    # The connections arq opened already (its startup PING) were made with its kwargs: they take these too.
    for conn in (*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())):
        for name, value in options.items():
            setattr(conn, name, value)
    return redis


async def enqueue_generation(
    redis: ArqRedis,
    order_id: int,
    brief: Brief | Mapping[str, Any] | None = None,
    regenerate: bool = False,
    *,
    queue_name: str = QUEUE_NAME,
) -> Job | None:
    """Enqueue the generation of an order; None when a job for the order is already queued or running.

    `brief` is validated here too, so a caller learns about a bad brief before it reaches the queue.
    """
    if isinstance(order_id, bool) or not isinstance(order_id, int) or order_id <= 0:
        raise ValueError(f"order_id must be a positive integer, got {order_id!r}")
    payload: dict[str, Any] | None = None
    if brief is not None:
        valid = brief if isinstance(brief, Brief) else Brief.model_validate(dict(brief))
        payload = valid.model_dump(mode="json")
    # A kept result of the previous job would make arq drop this one: the database, not the
    # result, says whether the order is done, so the stale result goes.
    await redis.delete(result_key_prefix + job_id(order_id))
    return await redis.enqueue_job(
        JOB_FUNCTION, order_id, brief=payload, regenerate=regenerate, _job_id=job_id(order_id), _queue_name=queue_name
    )


EDIT_FUNCTION = "edit_site"
ROLLBACK_FUNCTION = "rollback_site"
#: Every job function of the worker, and the positional argument that names the order (the first).
JOB_FUNCTIONS = (JOB_FUNCTION, EDIT_FUNCTION, ROLLBACK_FUNCTION)


async def changes_in_queue(redis: ArqRedis, order_id: int, *, queue_name: str = QUEUE_NAME) -> AsyncIterator[str]:
    """The ids of the order's edits and rollbacks in arq's queue, whatever their score: queued, retried later,
    or taken and not ended yet (arq removes a job from its queue when the job ends). One pass of ZSCAN over
    the queue, matching the order's job ids (`<function>:<order_id>:<key>`)."""
    prefixes = tuple(f"{function}:{order_id}:" for function in (EDIT_FUNCTION, ROLLBACK_FUNCTION))
    async for member, _ in redis.zscan_iter(queue_name, match=f"*_site:{order_id}:*", count=1000):
        job = member.decode() if isinstance(member, bytes) else member
        if job.startswith(prefixes):
            yield job


async def change_in_queue(redis: ArqRedis, order_id: int, *, queue_name: str = QUEUE_NAME) -> bool:
    """Whether an edit or rollback of the order is in arq's queue (`changes_in_queue`)."""
    async for _ in changes_in_queue(redis, order_id, queue_name=queue_name):
        return True
    return False


def _check_order_id(order_id: Any) -> None:
    if isinstance(order_id, bool) or not isinstance(order_id, int) or order_id <= 0:
        raise ValueError(f"order_id must be a positive integer, got {order_id!r}")


_last_send_ns = 0


def send_key() -> str:
    """The last part of an edit's or rollback's job id: this process's send time in nanoseconds (never the
    same twice, never going back), then 12 random hex digits. arq stamps a job's enqueue time in
    milliseconds; the edits of an order sent in the same millisecond run in the order of this key."""
    global _last_send_ns
    _last_send_ns = max(time.time_ns(), _last_send_ns + 1)
    return f"{_last_send_ns:020d}{uuid.uuid4().hex[:12]}"


def sent_order(job_id: str) -> str:
    """What orders jobs of one order sent in the same millisecond: their job id's last part."""
    return job_id.rsplit(":", 1)[-1]


async def enqueue_edit(
    redis: ArqRedis,
    order_id: int,
    instruction: str,
    *,
    base_version: int | None = None,
    pages: list[str] | None = None,
    queue_name: str = QUEUE_NAME,
) -> Job | None:
    """Enqueue an edit of an order's live site. Each edit is a job of its own (its id is new); an order's
    edits run one at a time, in the order they were enqueued."""
    _check_order_id(order_id)
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("instruction must be a non-empty string")
    return await redis.enqueue_job(
        EDIT_FUNCTION,
        order_id,
        instruction,
        base_version=base_version,
        pages=pages,
        _job_id=f"{EDIT_FUNCTION}:{order_id}:{send_key()}",
        _queue_name=queue_name,
    )


async def enqueue_rollback(redis: ArqRedis, order_id: int, version: int, *, queue_name: str = QUEUE_NAME) -> Job | None:
    """Enqueue a rollback: version `version` of the order's site becomes live again, as a new version."""
    _check_order_id(order_id)
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    return await redis.enqueue_job(
        ROLLBACK_FUNCTION,
        order_id,
        version,
        _job_id=f"{ROLLBACK_FUNCTION}:{order_id}:{send_key()}",
        _queue_name=queue_name,
    )
