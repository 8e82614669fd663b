"""What tests share besides fixtures: the sample brief and ways to wait for a job."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from arq import ArqRedis
from arq.jobs import Job
from arq.worker import Worker

from worker import client

WorkerFactory = Callable[..., Awaitable[Worker]]

SAMPLE_BRIEF: dict[str, Any] = {
    "business_name": "Rosa's Bakery",
    "description": "Family bakery in Porto baking sourdough bread, pastel de nata and celebration cakes since 1998.",
    "industry": "bakery",
    "location": "Porto, Portugal",
    "services": ["Sourdough bread", "Pastries", "Custom cakes"],
    "contact": {
        "email": "hello@rosasbakery.example",
        "phone": "+351 222 000 111",
        "address": "Rua das Flores 12, Porto",
    },
}


def order_job(redis: ArqRedis, order_id: int) -> Job:
    return Job(client.job_id(order_id), redis, _queue_name=client.QUEUE_NAME, _deserializer=client.deserialize)


async def wait_for_result(redis: ArqRedis, order_id: int, timeout: float = 60) -> Any:
    """The result of the order's job, as a client would read it."""
    return await order_job(redis, order_id).result(timeout=timeout, poll_delay=0.05)
