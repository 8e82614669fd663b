"""Enqueueing generations from Python: the JSON serializer, the queue and the job id, in one place.

    from worker.client import connect, enqueue_generation
    redis = await connect("redis://localhost:6379/0")
    await enqueue_generation(redis, order_id=42, brief={"business_name": "...", "description": "..."})

Jobs are JSON, never pickle: a pickled payload in Redis would run code for anyone who can write
to Redis, so the worker refuses them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from arq.constants import result_key_prefix
from arq.jobs import Job

from worker.models import Brief

QUEUE_NAME = "site_generation"
JOB_FUNCTION = "generate_site"


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


async def connect(redis_url: str) -> ArqRedis:
    """An arq Redis pool that speaks the worker's JSON serializer."""
    return await create_pool(
        RedisSettings.from_dsn(redis_url),
        job_serializer=serialize,
        job_deserializer=deserialize,
        default_queue_name=QUEUE_NAME,
    )


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
