"""Turning a model's text answer into a validated pydantic model, re-asking the model when it must.

The same path serves every provider, the offline one included: find the JSON (code fences and
chatter around it are tolerated), repair it with json-repair when it is malformed (logging where
it broke), validate it, run the phase's own checks, and re-ask with the error, a bounded number
of times.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import json_repair
import orjson
from loguru import logger
from pydantic import BaseModel, ValidationError

from worker.ai.base import AIRequest, AIRouter, Notify, Task, Usage
from worker.errors import AIBadOutput

M = TypeVar("M", bound=BaseModel)

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)
PROMPTS_DIR = Path(__file__).parent / "prompts"


class MalformedAnswer(ValueError):
    pass


@cache
def _template(task: Task) -> tuple[str, string.Template]:
    system, _, prompt = (PROMPTS_DIR / f"{task}.md").read_text().partition("\n---\n")
    return system.strip(), string.Template(prompt.strip())


@cache
def _schema_text(schema: type[BaseModel]) -> str:
    # Building a JSON schema walks the whole model: once per model, not once per call.
    return json.dumps(schema.model_json_schema(), separators=(",", ":"))


def render_prompt(task: Task, inputs: dict[str, Any], schema: type[BaseModel]) -> AIRequest:
    """The request for a task: its template with the inputs and the answer's JSON schema filled in."""
    system, template = _template(task)
    prompt = template.substitute(
        schema=_schema_text(schema),
        # "<" escaped as \u003c (same JSON value) so no text in the brief can close the <input> block.
        input=orjson.dumps(inputs).decode().replace("<", "\\u003c"),
    )
    return AIRequest(task=task, system=system, prompt=prompt)


def extract_input(prompt: str) -> Any:
    """The inputs a prompt carries between <input> tags (what the offline provider reads)."""
    start = prompt.rindex("<input>") + len("<input>")
    end = prompt.index("</input>", start)
    return json.loads(prompt[start:end])


def extract_json(text: str) -> Any:
    """The JSON value in a model's answer; raises MalformedAnswer saying where it broke."""
    return _extract(text)[0]


def _extract(text: str) -> tuple[Any, str | None]:
    """The JSON value and, when it had to be repaired, where the original broke."""
    fenced = _FENCE.search(text)
    candidate = fenced.group(1) if fenced else text
    start = min((i for i in (candidate.find("{"), candidate.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise MalformedAnswer(f"the answer holds no JSON object ({len(text)} characters)")
    candidate = candidate[start:]
    try:
        return orjson.loads(candidate), None  # the usual answer: JSON and nothing after it
    except orjson.JSONDecodeError:
        pass
    try:
        value, _ = json.JSONDecoder().raw_decode(candidate)
        return value, None
    except json.JSONDecodeError as exc:
        context = candidate[max(exc.pos - 60, 0) : exc.pos + 60]
        logger.warning(
            "malformed JSON from the model at line {} column {} (char {} of {}): {}; context: {!r}",
            exc.lineno,
            exc.colno,
            exc.pos,
            len(candidate),
            exc.msg,
            context,
        )
        where = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg} (near {context!r})"
        repaired = json_repair.loads(candidate)
        if isinstance(repaired, dict | list) and repaired:
            logger.info("repaired the malformed JSON with json-repair")
            return repaired, where
        raise MalformedAnswer(where) from exc


def _validation_summary(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:10])


async def ask_model(
    router: AIRouter,
    task: Task,
    inputs: dict[str, Any],
    schema: type[M],
    *,
    check: Callable[[M], None] | None = None,
    max_retries: int,
    notify: Notify,
    before_call: Callable[[], None] | None = None,
) -> tuple[M, Usage]:
    """Ask the task's provider for a `schema` answer; re-ask with the error up to `max_retries` times.

    `before_call` runs before each call to the model and may raise to stop there (a lost claim).
    """
    request = render_prompt(task, inputs, schema)
    usage = Usage()
    problem = ""
    for attempt in range(max_retries + 1):
        asked = (
            request
            if not problem
            else AIRequest(
                task=task,
                system=request.system,
                prompt=f"{request.prompt}\n\nYour previous answer was rejected: {problem}\n"
                "Answer again with one JSON object that fixes this, and nothing else.",
            )
        )
        if before_call is not None:
            before_call()
        reply = await router.complete(asked, notify=notify)
        usage += reply.usage
        repair_note = None
        try:
            if reply.finish_reason == "length":
                raise MalformedAnswer("the answer was cut off at the provider's length limit")
            value, repair_note = _extract(reply.text)
            answer = schema.model_validate(value)
            if check is not None:
                check(answer)
            return answer, usage
        except ValidationError as exc:
            problem = _validation_summary(exc)
        except ValueError as exc:  # MalformedAnswer and the phase's own checks
            problem = str(exc)
        if repair_note:
            problem = f"{repair_note}; after repair: {problem}"
        await notify(
            f"{task} answer rejected (attempt {attempt + 1} of {max_retries + 1})",
            level="warning",
            event="model.answer_rejected",
            provider=reply.provider,
            model=reply.model,
            problem=problem[:2000],
        )
    raise AIBadOutput(
        f"{task}: the model's answer failed validation {max_retries + 1} times; last problem: {problem[:1000]}",
        provider=reply.provider,
        task=task,
        model=reply.model,
    )
