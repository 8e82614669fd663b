"""The fake AI provider: real HTTP answers in three API shapes, and every fault it can be told to make."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import json_repair
import pytest
from pydantic import BaseModel, ValidationError

from worker.ai.base import AIRequest
from worker.ai.parsing import extract_json, render_prompt
from worker.local.fake_server import CF_QUOTA_MESSAGE, FakeProviderServer, validate_fault
from worker.local.offline_site import offline_code, offline_content, offline_plan
from worker.models import Brief, GeneratedFile, SiteCode, SiteContent, SitePlan

APIS = ["openai", "anthropic", "cloudflare"]
CF_MODEL = "@cf/meta/llama-3.1-8b-instruct"

BRIEF = Brief.model_validate(
    {
        "business_name": "Rosa's Bakery",
        "description": "Family bakery in Porto baking sourdough bread and celebration cakes since 1998.",
        "industry": "bakery",
        "location": "Rua das Flores 12, Porto",
        "services": ["Sourdough bread", "Pastries", "Custom cakes"],
        "contact": {"email": "hello@rosasbakery.pt", "phone": "+351 222 000 111"},
    }
)
PLAN = offline_plan(BRIEF)
CONTENT = offline_content(BRIEF, PLAN)


def brief_json() -> dict[str, Any]:
    return BRIEF.model_dump(mode="json")


CODE = offline_code(PLAN, CONTENT)
PROMPTS: dict[str, tuple[AIRequest, type[BaseModel], BaseModel]] = {
    "planning": (render_prompt("planning", {"brief": brief_json()}, SitePlan), SitePlan, PLAN),
    "content": (
        render_prompt("content", {"brief": brief_json(), "plan": PLAN.model_dump(mode="json")}, SiteContent),
        SiteContent,
        CONTENT,
    ),
    "coding": (
        render_prompt(
            "coding",
            {
                "brief": brief_json(),
                "plan": PLAN.model_dump(mode="json"),
                "content": CONTENT.model_dump(mode="json"),
            },
            SiteCode,
        ),
        SiteCode,
        CODE,
    ),
}


@pytest.fixture(scope="module")
def shared() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


@pytest.fixture
def server(shared: FakeProviderServer) -> Iterator[FakeProviderServer]:
    shared.reset()
    shared.configure(latency_s=0, latency_max_s=0, rate_429=0, rate_500=0, seed=0, rate_limit_rpm=0)
    yield shared
    shared.reset()
    shared.configure(latency_s=0, latency_max_s=0, rate_429=0, rate_500=0, seed=0, rate_limit_rpm=0)


@pytest.fixture
def client() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=10) as c:
        yield c


def call(
    client: httpx2.Client, server: FakeProviderServer, api: str, task: str = "planning", **kwargs: Any
) -> httpx2.Response:
    request = PROMPTS[task][0]
    if api == "openai":
        return client.post(
            f"{server.url}/v1/chat/completions",
            headers={"Authorization": "Bearer sk-test"},
            json={
                "model": "gpt-test",
                "messages": [
                    {"role": "system", "content": request.system},
                    {"role": "user", "content": request.prompt},
                ],
                "max_tokens": 8000,
            },
            **kwargs,
        )
    if api == "anthropic":
        return client.post(
            f"{server.url}/v1/messages",
            headers={"x-api-key": "ak-test", "anthropic-version": "2023-06-01"},
            json={
                "model": "claude-test",
                "max_tokens": 8000,
                "system": request.system,
                # Content as a list of text blocks: the other accepted shape.
                "messages": [{"role": "user", "content": [{"type": "text", "text": request.prompt}]}],
            },
            **kwargs,
        )
    return client.post(
        f"{server.url}/client/v4/accounts/acc123/ai/run/{CF_MODEL}",
        headers={"Authorization": "Bearer cf-test"},
        json={
            "messages": [
                {"role": "system", "content": request.system},
                {"role": "user", "content": request.prompt},
            ],
            "max_tokens": 8000,
        },
        **kwargs,
    )


def text_of(api: str, response: httpx2.Response) -> str:
    data = response.json()
    if api == "openai":
        return str(data["choices"][0]["message"]["content"])
    if api == "anthropic":
        return str(data["content"][0]["text"])
    return str(data["result"]["response"])


def finish_of(api: str, response: httpx2.Response) -> str | None:
    data = response.json()
    if api == "openai":
        return str(data["choices"][0]["finish_reason"])
    if api == "anthropic":
        return str(data["stop_reason"])
    return None


def error_type(api: str, response: httpx2.Response) -> Any:
    data = response.json()
    if api == "openai":
        return data["error"]["type"]
    if api == "anthropic":
        assert data["type"] == "error"
        return data["error"]["type"]
    assert data["success"] is False and data["result"] is None
    return data["errors"][0]["code"]


# --------------------------------------------------------------------------- normal answers


@pytest.mark.parametrize("api", APIS)
def test_each_api_answers_a_planning_prompt(server: FakeProviderServer, client: httpx2.Client, api: str) -> None:
    response = call(client, server, api)
    assert response.status_code == 200
    assert SitePlan.model_validate_json(text_of(api, response)) == PLAN
    data = response.json()
    text = text_of(api, response)
    if api == "openai":
        assert data["id"] == "chatcmpl-1" and data["object"] == "chat.completion"
        assert data["model"] == "gpt-test" and data["choices"][0]["finish_reason"] == "stop"
        usage = data["usage"]
        assert usage["completion_tokens"] == len(text) // 4
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert response.headers["x-request-id"] == "req_1"
    elif api == "anthropic":
        assert data["id"] == "msg_1" and data["type"] == "message" and data["role"] == "assistant"
        assert data["stop_reason"] == "end_turn" and data["stop_sequence"] is None
        assert data["usage"]["output_tokens"] == len(text) // 4
        assert response.headers["request-id"] == "req_1"
    else:
        assert data["success"] is True and data["errors"] == [] and data["messages"] == []
        assert data["result"]["usage"]["completion_tokens"] == len(text) // 4
        assert response.headers["cf-ray"] == "1-FAKE"
    request = PROMPTS["planning"][0]
    prompt_tokens = (len(request.system) + len(request.prompt)) // 4
    usage = data.get("usage") or data["result"]["usage"]
    assert usage.get("prompt_tokens", usage.get("input_tokens")) == prompt_tokens


@pytest.mark.parametrize("task", ["content", "coding"])
def test_content_and_coding_tasks(server: FakeProviderServer, client: httpx2.Client, task: str) -> None:
    _, schema, expected = PROMPTS[task]
    response = call(client, server, "anthropic", task)
    assert response.status_code == 200
    answer: BaseModel = schema.model_validate_json(text_of("anthropic", response))
    assert answer == expected


def test_prompt_without_input_block_gets_a_small_json_answer(server: FakeProviderServer, client: httpx2.Client) -> None:
    response = client.post(
        f"{server.url}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 200
    assert json.loads(text_of("openai", response)) == {"ok": True}


def test_unknown_path_is_404_json(server: FakeProviderServer, client: httpx2.Client) -> None:
    response = client.post(f"{server.url}/v1/nothing-here", json={})
    assert response.status_code == 404
    assert "error" in response.json()


def test_bad_request_body_is_a_400_in_the_provider_shape(server: FakeProviderServer, client: httpx2.Client) -> None:
    response = client.post(f"{server.url}/v1/messages", json={"model": "m", "max_tokens": 10})
    assert response.status_code == 400
    assert error_type("anthropic", response) == "invalid_request_error"


def test_requests_are_recorded_with_headers_and_bodies(server: FakeProviderServer, client: httpx2.Client) -> None:
    call(client, server, "openai")
    call(client, server, "cloudflare")
    first, second = server.wait_for_requests(2)
    assert (first.api, first.method, first.path, first.fault) == ("openai", "POST", "/v1/chat/completions", "ok")
    assert first.headers["authorization"] == "Bearer sk-test"
    assert first.headers["content-type"] == "application/json"
    assert first.body["model"] == "gpt-test"
    assert second.api == "cloudflare" and second.path.endswith(CF_MODEL)
    assert first.at <= second.at


def test_count_says_how_many_api_requests_arrived(server: FakeProviderServer, client: httpx2.Client) -> None:
    # The benchmarks read it to know every generation has its model call in flight (bench.fake keeps no bodies).
    assert client.get(f"{server.url}/_fake/count").json() == {"requests": 0}
    call(client, server, "openai")
    call(client, server, "openai")
    assert client.get(f"{server.url}/_fake/count").json() == {"requests": 2}


def test_wait_for_requests_blocks_until_they_arrive(server: FakeProviderServer) -> None:
    def later() -> None:
        with httpx2.Client() as c:
            call(c, server, "openai")

    thread = threading.Thread(target=later)
    thread.start()
    recorded = server.wait_for_requests(1, timeout=5)
    thread.join(5)
    assert len(recorded) == 1
    with pytest.raises(TimeoutError):
        server.wait_for_requests(2, timeout=0.05)


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, {"openai": "invalid_request_error", "anthropic": "authentication_error"}),
        (403, {"openai": "permission_error", "anthropic": "permission_error"}),
        (400, {"openai": "invalid_request_error", "anthropic": "invalid_request_error"}),
        (429, {"openai": "rate_limit_error", "anthropic": "rate_limit_error"}),
        (500, {"openai": "server_error", "anthropic": "api_error"}),
        (503, {"openai": "server_error", "anthropic": "api_error"}),
        (529, {"openai": "server_error", "anthropic": "overloaded_error"}),
    ],
)
def test_status_faults(
    server: FakeProviderServer, client: httpx2.Client, api: str, status: int, expected: dict[str, str]
) -> None:
    server.script(f"status:{status}")
    response = call(client, server, api)
    assert response.status_code == status
    kind = error_type(api, response)
    if api in expected:
        assert kind == expected[api]
    else:
        assert isinstance(kind, int)
    if status == 401:
        assert "invalid api key" in response.text
    assert "retry-after" not in response.headers
    assert server.requests[-1].fault == f"status:{status}"


def test_status_fault_then_normal_answers(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.script("status:500", "ok", "status:503")
    assert [call(client, server, "openai").status_code for _ in range(4)] == [500, 200, 503, 200]
    assert [r.fault for r in server.requests] == ["status:500", "ok", "status:503", "ok"]


def test_429_with_retry_after(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.script("429:2")
    response = call(client, server, "anthropic")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert error_type("anthropic", response) == "rate_limit_error"


def test_429_with_retry_after_ms(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.script("429ms:250")
    response = call(client, server, "openai")
    assert response.status_code == 429
    assert response.headers["retry-after-ms"] == "250"
    assert "retry-after" not in response.headers


@pytest.mark.parametrize("value", ["inf", "NaN", "-5", "1e12", "Infinity", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_429_sends_hostile_retry_after_values_verbatim(
    server: FakeProviderServer, client: httpx2.Client, value: str
) -> None:
    server.script(f"429:{value}")
    response = call(client, server, "openai")
    assert response.status_code == 429
    assert response.headers["retry-after"] == value


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "1e12", "2.5"])
def test_429ms_sends_hostile_retry_after_ms_values_verbatim(
    server: FakeProviderServer, client: httpx2.Client, value: str
) -> None:
    server.script(f"429ms:{value}")
    response = call(client, server, "anthropic")
    assert response.status_code == 429
    assert response.headers["retry-after-ms"] == value


@pytest.mark.parametrize("api", APIS)
def test_junk_body_carries_nul_bytes_and_invalid_utf8(
    server: FakeProviderServer, client: httpx2.Client, api: str
) -> None:
    server.script("junk:500")
    response = call(client, server, api)
    assert response.status_code == 500
    assert b"\x00" in response.content
    with pytest.raises(UnicodeDecodeError):
        response.content.decode()
    assert call(client, server, api).status_code == 200


def test_when_aims_a_fault_at_the_requests_it_accepts(server: FakeProviderServer, client: httpx2.Client) -> None:
    def coding(body: object) -> bool:
        assert isinstance(body, dict)
        return '"content"' in body["messages"][-1]["content"]

    def broken(body: object) -> bool:
        raise KeyError("a predicate that raises counts as a no")

    server.script("status:503", when=broken)
    server.script("status:502", when=coding)
    assert call(client, server, "openai", "planning").status_code == 200
    assert call(client, server, "openai", "content").status_code == 200
    assert call(client, server, "openai", "coding").status_code == 502
    assert call(client, server, "openai", "coding").status_code == 200
    assert server.pending_script() == [("status:503", None)]


def test_rate_limit_answers_429_beyond_the_requests_per_minute_and_says_when(
    server: FakeProviderServer, client: httpx2.Client
) -> None:
    server.configure(rate_limit_rpm=2)
    assert [call(client, server, "openai").status_code for _ in range(2)] == [200, 200]
    refused = call(client, server, "openai")
    assert refused.status_code == 429 and error_type("openai", refused) == "rate_limit_error"
    wait_ms = float(refused.headers["retry-after-ms"])
    assert 59_000 < wait_ms <= 60_000, "the first answered request leaves the 60 s window then"
    assert refused.headers["retry-after"] == "60"
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert [r.fault.split(":")[0] for r in server.requests] == ["ok", "ok", "rate-limited"]
    server.configure(rate_limit_rpm=0)
    assert call(client, server, "openai").status_code == 200


@pytest.mark.parametrize("api", APIS)
def test_cloudflare_quota_body(server: FakeProviderServer, client: httpx2.Client, api: str) -> None:
    server.script("cf-quota")
    response = call(client, server, api)
    assert response.status_code == 429
    assert response.json() == {
        "result": None,
        "success": False,
        "errors": [{"code": 3036, "message": CF_QUOTA_MESSAGE}],
        "messages": [],
    }


def test_delay_then_answer(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.script("delay:0.3")
    with pytest.raises(httpx2.ReadTimeout):
        call(client, server, "openai", timeout=0.1)
    server.script("delay:0.05")
    response = call(client, server, "openai")
    assert response.status_code == 200
    assert SitePlan.model_validate_json(text_of("openai", response)) == PLAN


def test_hang_times_out(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.script("hang")
    with pytest.raises(httpx2.ReadTimeout):
        call(client, server, "anthropic", timeout=0.5)
    assert server.requests[-1].fault == "hang"


@pytest.mark.parametrize("api", APIS)
def test_reset_drops_the_connection(server: FakeProviderServer, client: httpx2.Client, api: str) -> None:
    server.script("reset")
    with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.ConnectError)):
        call(client, server, api)
    # The server keeps serving afterwards.
    assert call(client, server, api).status_code == 200


@pytest.mark.parametrize("api", APIS)
def test_truncated(server: FakeProviderServer, client: httpx2.Client, api: str) -> None:
    server.script("truncated")
    response = call(client, server, api)
    assert response.status_code == 200
    full = PLAN.model_dump_json()
    assert text_of(api, response) == full[: len(full) // 2]
    assert finish_of(api, response) == {"openai": "length", "anthropic": "max_tokens", "cloudflare": None}[api]


@pytest.mark.parametrize("task", ["planning", "content"])
def test_malformed_is_repairable(server: FakeProviderServer, client: httpx2.Client, task: str) -> None:
    server.script("malformed")
    response = call(client, server, "openai", task)
    text = text_of("openai", response)
    expected = json.loads(PROMPTS[task][2].model_dump_json())
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert json_repair.loads(text) == expected
    assert extract_json(text) == expected


def test_malformed_coding_answer_is_still_invalid_json(server: FakeProviderServer, client: httpx2.Client) -> None:
    # json-repair rewrites some escapes inside CSS strings, so only the shape is checked here.
    server.script("malformed")
    text = text_of("cloudflare", call(client, server, "cloudflare", "coding"))
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    repaired: Any = json_repair.loads(text)
    assert len(repaired["files"]) == len(CODE.files)


def test_malformed_hard_is_beyond_repair(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.script("malformed-hard")
    text = text_of("anthropic", call(client, server, "anthropic"))
    assert text.startswith('{"pages": [')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(ValidationError):
        SitePlan.model_validate(json_repair.loads(text))


def test_fenced(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.script("fenced")
    text = text_of("openai", call(client, server, "openai"))
    assert text.startswith("Here is the JSON you asked for:\n```json\n")
    assert text.endswith("\n```\nLet me know if you need changes.")
    assert SitePlan.model_validate(extract_json(text)) == PLAN


def test_wrong_schema(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.script("wrong-schema")
    text = text_of("cloudflare", call(client, server, "cloudflare"))
    assert json.loads(text) == {"unexpected": "shape", "pages": "not a list"}
    with pytest.raises(ValidationError):
        SitePlan.model_validate_json(text)


def test_script_for_one_api_leaves_the_others_alone(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.script("status:529", "status:529", api="anthropic")
    assert call(client, server, "openai").status_code == 200
    assert call(client, server, "cloudflare").status_code == 200
    assert call(client, server, "anthropic").status_code == 529
    assert call(client, server, "openai").status_code == 200
    assert call(client, server, "anthropic").status_code == 529
    assert call(client, server, "anthropic").status_code == 200
    assert [r.fault for r in server.requests] == ["ok", "ok", "status:529", "ok", "status:529", "ok"]


def test_unknown_faults_are_refused(server: FakeProviderServer) -> None:
    for bad in ("explode", "status:abc", "status:200", "delay:", "429ms:x", "429:", "429:a\nb", "junk:200", "junk:x"):
        with pytest.raises(ValueError):
            server.script(bad)
    with pytest.raises(ValueError):
        server.script("ok", api="gemini")
    assert validate_fault("429:1.5") == "429:1.5"


def test_random_429s(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.configure(rate_429=1.0)
    responses = [call(client, server, "openai") for _ in range(3)]
    assert [r.status_code for r in responses] == [429, 429, 429]
    assert all(r.headers["retry-after"] == "1" for r in responses)
    assert {r.fault for r in server.requests} == {"429:1"}
    server.script("ok")  # a script entry wins over the random faults
    assert call(client, server, "openai").status_code == 200


def test_random_500s_are_seeded(server: FakeProviderServer, client: httpx2.Client) -> None:
    def run() -> list[int]:
        server.reset()
        server.configure(rate_500=0.5, seed=7)
        return [call(client, server, "cloudflare").status_code for _ in range(12)]

    first = run()
    assert set(first) == {200, 500}
    assert run() == first


def test_latency_applies_to_every_answer(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.configure(latency_s=0.3)
    server.script("status:500")
    with pytest.raises(httpx2.ReadTimeout):
        call(client, server, "openai", timeout=0.1)


# --------------------------------------------------------------------------- control over HTTP


def test_control_endpoints(server: FakeProviderServer, client: httpx2.Client) -> None:
    base = f"{server.url}/_fake"
    assert client.post(f"{base}/script", json={"faults": ["status:503"], "api": "openai"}).json()["ok"] is True
    assert client.post(f"{base}/script", json={"faults": ["nonsense"], "api": None}).status_code == 400
    assert call(client, server, "anthropic").status_code == 200
    assert call(client, server, "openai").status_code == 503

    recorded = client.get(f"{base}/requests").json()
    assert [(r["api"], r["fault"]) for r in recorded] == [("anthropic", "ok"), ("openai", "status:503")]
    assert set(recorded[0]) == {"at", "wall", "method", "path", "headers", "body", "api", "fault"}
    assert recorded[1]["headers"]["authorization"] == "Bearer sk-test"
    assert recorded[1]["body"]["model"] == "gpt-test"

    assert client.post(f"{base}/configure", json={"rate_429": 1.0, "seed": 3}).status_code == 200
    assert server.rate_429 == 1.0
    assert call(client, server, "cloudflare").status_code == 429
    assert client.post(f"{base}/configure", json={"bogus": 1}).status_code == 400
    client.post(f"{base}/configure", json={"rate_429": 0})

    client.post(f"{base}/script", json={"faults": ["hang"]})
    assert client.post(f"{base}/reset").json() == {"ok": True}
    assert client.get(f"{base}/requests").json() == []
    assert server.requests == [] and server.pending_script() == []
    response = call(client, server, "openai")
    assert response.status_code == 200 and response.headers["x-request-id"] == "req_1"


# --------------------------------------------------------------------------- shutdown


def test_stop_releases_a_hanging_request() -> None:
    server = FakeProviderServer().start()
    url = server.url
    outcome: list[BaseException | int] = []

    def hang() -> None:
        try:
            with httpx2.Client(timeout=30) as c:
                outcome.append(call(c, server, "openai").status_code)
        except httpx2.HTTPError as exc:
            outcome.append(exc)

    server.script("hang")
    thread = threading.Thread(target=hang, daemon=True)
    thread.start()
    server.wait_for_requests(1, timeout=5)
    server.stop()
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], httpx2.HTTPError)
    with pytest.raises(httpx2.ConnectError):
        httpx2.post(f"{url}/v1/chat/completions", json={}, timeout=1)


# --------------------------------------------------------------------------- text:<payload>

ODD_TEXT = 'Sure! Here: {"a": "b:c"}\n\tline two: \u00e9\u00e8 \u2603 "quoted" \\ back\\slash\r\nend:'


@pytest.mark.parametrize("api", APIS)
def test_text_fault_answers_the_payload_verbatim(server: FakeProviderServer, client: httpx2.Client, api: str) -> None:
    server.script(f"text:{ODD_TEXT}", "text:")
    response = call(client, server, api, "coding")
    assert response.status_code == 200
    assert text_of(api, response) == ODD_TEXT
    assert finish_of(api, response) in ("stop", "end_turn", None)
    assert server.requests[-1].fault == f"text:{ODD_TEXT}"
    empty = call(client, server, api)
    assert empty.status_code == 200 and text_of(api, empty) == ""
    usage = response.json().get("usage") or response.json()["result"]["usage"]
    assert usage.get("completion_tokens", usage.get("output_tokens")) == max(1, len(ODD_TEXT) // 4)


def test_text_fault_needs_no_input_block(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.script("text:plain words")
    response = client.post(
        f"{server.url}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 200 and text_of("openai", response) == "plain words"


def test_text_fault_is_a_known_fault() -> None:
    assert validate_fault("text:a:b:c") == "text:a:b:c"
    assert validate_fault("text:") == "text:"
    with pytest.raises(ValueError, match="text:<answer text>"):
        validate_fault("texts:x")


def big_site_code_text(files: int) -> str:
    code = SiteCode.model_construct(
        files=[
            *CODE.files,
            *(GeneratedFile.model_construct(path=f"extra/f{i}.txt", content=f"file {i}") for i in range(files)),
        ]
    )
    return code.model_dump_json()


def test_big_text_payload_in_process(server: FakeProviderServer, client: httpx2.Client) -> None:
    payload = '{"files": [{"path": "index.html", "content": "' + "x" * 50_000_000 + '"}]}'
    server.script("text:" + payload)
    response = call(client, server, "openai", "coding", timeout=60)
    assert response.status_code == 200
    assert text_of("openai", response) == payload


def test_big_text_payload_over_the_control_endpoint(server: FakeProviderServer, client: httpx2.Client) -> None:
    payload = big_site_code_text(5000)
    assert len(payload) > 150_000
    answer = client.post(f"{server.url}/_fake/script", json={"faults": [f"text:{payload}"], "repeat": 2}, timeout=60)
    assert answer.json() == {"ok": True, "queued": 2}
    for api in ("anthropic", "cloudflare"):
        text = text_of(api, call(client, server, api, "coding"))
        assert text == payload
        assert len(json.loads(text)["files"]) == len(CODE.files) + 5000
    assert server.pending_script() == []
    for bad in (0, "2", True, 10_001):
        assert client.post(f"{server.url}/_fake/script", json={"faults": ["ok"], "repeat": bad}).status_code == 400


# --------------------------------------------------------------------------- latency ranges, wall clock


def test_latency_range_is_uniform_and_seeded(server: FakeProviderServer) -> None:
    server.configure(latency_s=0.1, latency_max_s=0.3, seed=5)
    draws = [server._latency() for _ in range(200)]
    assert all(0.1 <= d <= 0.3 for d in draws)
    assert min(draws) < 0.13 and max(draws) > 0.27 and len(set(draws)) == 200
    server.reset()  # starts the seeded sequence over
    assert [server._latency() for _ in range(200)] == draws
    server.configure(seed=6)
    assert [server._latency() for _ in range(5)] != draws[:5]
    server.configure(latency_max_s=0.05)  # not above latency_s: a fixed latency
    assert {server._latency() for _ in range(5)} == {0.1}
    with pytest.raises(ValueError):
        server.configure(latency_max_s=-1)


def test_latency_range_does_not_change_the_random_faults(server: FakeProviderServer, client: httpx2.Client) -> None:
    def statuses(latency_max_s: float) -> list[int]:
        server.reset()
        server.configure(rate_500=0.5, seed=11, latency_s=0, latency_max_s=latency_max_s)
        return [call(client, server, "openai").status_code for _ in range(8)]

    assert statuses(0.0) == statuses(0.02)


def test_latency_range_delays_each_answer(server: FakeProviderServer, client: httpx2.Client) -> None:
    server.configure(latency_s=0.1, latency_max_s=0.2)
    for _ in range(3):
        started = time.monotonic()
        assert call(client, server, "openai").status_code == 200
        assert 0.1 <= time.monotonic() - started < 1.0
    with pytest.raises(httpx2.ReadTimeout):
        call(client, server, "openai", timeout=0.05)


def test_latency_range_over_the_control_endpoint(server: FakeProviderServer, client: httpx2.Client) -> None:
    base = f"{server.url}/_fake"
    assert client.post(f"{base}/configure", json={"latency_s": 0.01, "latency_max_s": 0.02}).status_code == 200
    assert (server.latency_s, server.latency_max_s) == (0.01, 0.02)
    assert client.post(f"{base}/configure", json={"latency_max_s": -0.5}).status_code == 400
    assert client.post(f"{base}/configure", json={"latency_max_s": "soon"}).status_code == 400
    assert server.latency_max_s == 0.02


def test_requests_record_the_wall_clock(server: FakeProviderServer, client: httpx2.Client) -> None:
    before = time.time()
    call(client, server, "openai")
    client.post(f"{server.url}/v1/unknown", json={})
    after = time.time()
    recorded = server.wait_for_requests(2)
    assert all(before <= r.wall <= after for r in recorded)
    assert recorded[0].wall <= recorded[1].wall
    listed = client.get(f"{server.url}/_fake/requests").json()
    assert [r["wall"] for r in listed] == [r.wall for r in recorded]


def test_cli_latency_range() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.local.fake_server", "--latency", "0.15", "--latency-max", "0.3", "--seed", "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("FAKE_PROVIDER_URL=http://127.0.0.1:")
        url = line.partition("=")[2]
        with httpx2.Client(timeout=10) as c:
            for _ in range(2):
                started = time.monotonic()
                response = c.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
                assert response.status_code == 200
                assert 0.15 <= time.monotonic() - started < 1.5
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
