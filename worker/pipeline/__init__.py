"""The generation: four phases (plan, content, code, assemble) and the runner that drives them.

Each phase module is a plain function from inputs to a validated output, given `ask` to call
the model; the runner (`runner.py`) is the only code here that touches the database or disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from worker.ai.base import Task, Usage

M = TypeVar("M", bound=BaseModel)


class Ask(Protocol):
    """Ask the model routed for `task` for an answer of type `schema` (see worker.ai.parsing.ask_model)."""

    async def __call__(
        self, task: Task, inputs: dict[str, Any], schema: type[M], *, check: Callable[[M], None] | None = None
    ) -> tuple[M, Usage]: ...
