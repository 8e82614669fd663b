"""worker/ai/parsing.py: finding and repairing JSON in a model's answer, and re-asking on bad answers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from worker.ai.base import AIProvider, AIReply, AIRequest, AIRouter, Notify, Usage
from worker.ai.parsing import MalformedAnswer, ask_model, extract_json
from worker.errors import AIBadOutput, is_retryable

# --------------------------------------------------------------------------- extract_json


def test_plain_json_object() -> None:
    assert extract_json('{"name": "Rosa", "count": 3}') == {"name": "Rosa", "count": 3}


def test_plain_json_array() -> None:
    assert extract_json('[1, 2, {"a": null}]') == [1, 2, {"a": None}]


def test_json_in_a_json_fence() -> None:
    text = 'Here is the plan:\n```json\n{"name": "Rosa", "tags": ["a", "b"]}\n```\nLet me know!'
    assert extract_json(text) == {"name": "Rosa", "tags": ["a", "b"]}


def test_json_in_a_bare_fence_with_uppercase_tag() -> None:
    assert extract_json('```JSON\n{"ok": true}\n```') == {"ok": True}
    assert extract_json('```\n{"ok": false}\n```') == {"ok": False}


def test_json_with_prose_before_and_after() -> None:
    text = 'Sure! The answer is {"name": "Rosa", "nested": {"x": [1, 2]}} and that is all. {"ignored": 1}'
    assert extract_json(text) == {"name": "Rosa", "nested": {"x": [1, 2]}}


def test_braces_inside_strings_do_not_confuse_it() -> None:
    assert extract_json('{"css": "a { color: red }", "n": 1}') == {"css": "a { color: red }", "n": 1}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"name": "Rosa", "items": [1, 2,],}', {"name": "Rosa", "items": [1, 2]}),
        ("{'name': 'Rosa', 'count': 2}", {"name": "Rosa", "count": 2}),
        ('{"name": "Rosa", "inner": {"count": 2}', {"name": "Rosa", "inner": {"count": 2}}),
        ('```json\n{"name": "Rosa",\n```', {"name": "Rosa"}),
    ],
    ids=["trailing-comma", "single-quotes", "missing-closing-brace", "truncated-in-fence"],
)
def test_malformed_json_is_repaired(text: str, expected: Any) -> None:
    assert extract_json(text) == expected


@pytest.mark.parametrize("text", ["", "I cannot help with that.", "no json here, sorry (really)"])
def test_text_without_json_is_malformed(text: str) -> None:
    with pytest.raises(MalformedAnswer) as caught:
        extract_json(text)
    assert "no JSON" in str(caught.value)
    assert f"{len(text)} characters" in str(caught.value)


def test_unrepairable_json_says_where_it_broke() -> None:
    with pytest.raises(MalformedAnswer) as caught:
        extract_json("oops {")
    message = str(caught.value)
    assert "line 1 column 2" in message
    assert message.startswith("invalid JSON")


def test_malformed_answer_is_a_value_error() -> None:
    # ask_model relies on this to turn it into a re-ask.
    assert issubclass(MalformedAnswer, ValueError)


# --------------------------------------------------------------------------- ask_model


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    count: int = Field(ge=0)


class ScriptedProvider:
    """A fake AIProvider: replies with preset texts, in order, and records what it was asked."""

    def __init__(self, replies: Sequence[str | AIReply], *, usage: Usage | None = None) -> None:
        self.name = "scripted"
        self.model = "scripted-1"
        self.replies = list(replies)
        self.requests: list[AIRequest] = []
        self.usage = usage or Usage(input_tokens=10, output_tokens=5, calls=1)
        self.closed = False

    async def complete(self, request: AIRequest, *, notify: Notify | None = None) -> AIReply:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, AIReply):
            return reply
        return AIReply(text=reply, usage=self.usage, provider=self.name, model=self.model)

    async def aclose(self) -> None:
        self.closed = True


class Notes:
    """Records every notify() call as (message, keyword arguments)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, message: str, **kwargs: Any) -> None:
        self.calls.append((message, kwargs))


def make_router(provider: ScriptedProvider) -> AIRouter:
    providers: dict[str, AIProvider] = {"scripted": provider}
    return AIRouter(providers, {"planning": "scripted", "content": "scripted", "coding": "scripted"})


GOOD = json.dumps({"name": "Rosa", "count": 3})


async def test_first_good_answer_is_returned() -> None:
    provider = ScriptedProvider([GOOD])
    router = make_router(provider)
    notes = Notes()
    answer, usage = await ask_model(router, "planning", {"brief": {"x": 1}}, Answer, max_retries=2, notify=notes)
    assert answer == Answer(name="Rosa", count=3)
    assert usage == Usage(10, 5, 1)
    assert notes.calls == []
    assert router.calls["planning"] == 1
    request = provider.requests[0]
    assert request.task == "planning"
    assert '"brief":{"x":1}' in request.prompt  # the inputs are in the prompt
    assert '"count"' in request.prompt  # and so is the answer's schema
    assert "rejected" not in request.prompt


async def test_reasks_with_the_validation_error_and_succeeds_on_the_second_answer() -> None:
    provider = ScriptedProvider([json.dumps({"name": "Rosa", "count": -1}), GOOD])
    notes = Notes()
    answer, usage = await ask_model(make_router(provider), "content", {}, Answer, max_retries=2, notify=notes)
    assert answer.count == 3
    assert len(provider.requests) == 2
    first, second = provider.requests
    assert "rejected" not in first.prompt
    assert second.prompt.startswith(first.prompt)
    assert "Your previous answer was rejected" in second.prompt
    assert "count" in second.prompt.split("rejected:", 1)[1]
    assert "greater than or equal to 0" in second.prompt
    assert second.system == first.system
    assert second.task == "content"
    assert usage == Usage(20, 10, 2)
    assert len(notes.calls) == 1


async def test_malformed_json_is_reasked_with_the_parse_problem() -> None:
    provider = ScriptedProvider(["I'd rather not answer.", GOOD])
    answer, _ = await ask_model(make_router(provider), "planning", {}, Answer, max_retries=1, notify=Notes())
    assert answer.name == "Rosa"
    assert "holds no JSON" in provider.requests[1].prompt


async def test_check_failure_is_reasked() -> None:
    def check(answer: Answer) -> None:
        if answer.name != "Rosa":
            raise ValueError(f"name must be Rosa, not {answer.name}")

    provider = ScriptedProvider([json.dumps({"name": "Bob", "count": 1}), GOOD])
    answer, _ = await ask_model(make_router(provider), "coding", {}, Answer, check=check, max_retries=1, notify=Notes())
    assert answer.name == "Rosa"
    assert "name must be Rosa, not Bob" in provider.requests[1].prompt


async def test_gives_up_after_max_retries_plus_one_attempts() -> None:
    bad = [json.dumps({"name": "Rosa", "count": -i}) for i in range(1, 4)] + ['{"name": "", "count": 1}']
    provider = ScriptedProvider(bad)
    router = make_router(provider)
    notes = Notes()
    with pytest.raises(AIBadOutput) as caught:
        await ask_model(router, "planning", {}, Answer, max_retries=3, notify=notes)
    error = caught.value
    assert len(provider.requests) == 4
    assert router.calls["planning"] == 4
    assert not is_retryable(error)
    assert error.task == "planning"
    assert error.provider == "scripted"
    assert error.details["model"] == "scripted-1"
    assert "4 times" in str(error)
    # The last problem (empty name), not an earlier one (negative count).
    assert "last problem: name:" in str(error)
    assert "at least 1 character" in str(error)
    assert len(notes.calls) == 4


async def test_zero_retries_means_one_attempt() -> None:
    provider = ScriptedProvider(["nothing", GOOD])
    with pytest.raises(AIBadOutput, match="1 times"):
        await ask_model(make_router(provider), "planning", {}, Answer, max_retries=0, notify=Notes())
    assert len(provider.requests) == 1


async def test_a_cut_off_reply_is_bad_output_and_reasked() -> None:
    cut = AIReply(text=GOOD, usage=Usage(7, 100, 1), provider="scripted", model="scripted-1", finish_reason="length")
    provider = ScriptedProvider([cut, GOOD])
    notes = Notes()
    answer, usage = await ask_model(make_router(provider), "coding", {}, Answer, max_retries=1, notify=notes)
    assert answer == Answer(name="Rosa", count=3)  # the valid-looking JSON of the cut reply was not accepted
    assert len(provider.requests) == 2
    assert "length limit" in provider.requests[1].prompt
    assert usage == Usage(17, 105, 2)
    assert "length limit" in notes.calls[0][1]["problem"]


async def test_only_cut_off_replies_raise_bad_output() -> None:
    cut = AIReply(text=GOOD, usage=Usage(1, 1, 1), provider="scripted", model="scripted-1", finish_reason="length")
    provider = ScriptedProvider([cut, cut])
    with pytest.raises(AIBadOutput, match="length limit"):
        await ask_model(make_router(provider), "coding", {}, Answer, max_retries=1, notify=Notes())


async def test_usage_is_summed_over_attempts() -> None:
    replies: Sequence[str | AIReply] = [
        AIReply(text="no", usage=Usage(100, 1, 1), provider="scripted", model="m"),
        AIReply(text='{"name": 5}', usage=Usage(200, 2, 1), provider="scripted", model="m"),
        AIReply(text=GOOD, usage=Usage(300, 3, 1), provider="scripted", model="m"),
    ]
    _, usage = await ask_model(
        make_router(ScriptedProvider(replies)), "planning", {}, Answer, max_retries=2, notify=Notes()
    )
    assert usage == Usage(input_tokens=600, output_tokens=6, calls=3)


async def test_notify_is_called_once_per_rejected_answer_as_a_warning() -> None:
    provider = ScriptedProvider(["nope", '{"name": "Rosa"}', GOOD])
    notes = Notes()
    await ask_model(make_router(provider), "content", {}, Answer, max_retries=2, notify=notes)
    assert len(notes.calls) == 2
    for attempt, (message, kwargs) in enumerate(notes.calls, start=1):
        assert kwargs["level"] == "warning"
        assert kwargs["provider"] == "scripted"
        assert kwargs["model"] == "scripted-1"
        assert kwargs["problem"]
        assert message == f"content answer rejected (attempt {attempt} of 3)"
    assert "no JSON" in notes.calls[0][1]["problem"]
    assert "count" in notes.calls[1][1]["problem"]


async def test_router_sends_each_task_to_its_provider() -> None:
    planner = ScriptedProvider([GOOD])
    coder = ScriptedProvider([GOOD])
    coder.name = "coder"
    providers: dict[str, AIProvider] = {"planner": planner, "coder": coder}
    router = AIRouter(providers, {"planning": "planner", "content": "planner", "coding": "coder"})
    await ask_model(router, "coding", {}, Answer, max_retries=0, notify=Notes())
    assert len(coder.requests) == 1
    assert planner.requests == []
    await router.aclose()
    assert planner.closed and coder.closed
