"""A fake AI provider: a real HTTP server on loopback speaking the OpenAI, Anthropic and Cloudflare
Workers AI APIs with offline answers, and misbehaving (errors, hangs, resets, bad JSON) on request.

Faults (one per request, queued with `script()` or POST /_fake/script): ok, hang, reset, close (the
connection closed without an answer), truncated, malformed, malformed-hard, fenced, wrong-schema,
cf-quota, delay:<s>, status:<300-599> (a 3xx with a Location header), junk:<400-599> (that status with
a body of junk: NUL bytes, invalid UTF-8, control characters, not JSON), body:<status>:<raw text> (that
status with a plain-text body, verbatim: a NUL or any other character), 429:<value> (Retry-After: the
value verbatim, hostile ones included: inf, NaN, -5, 1e12, a date, any text without line breaks),
429ms:<ms> (retry-after-ms: any number Python reads, inf, nan and negative ones included),
headers:<status>:<JSON object> (that status, 200 with the usual answer, with these headers verbatim: a
Content-Type or Content-Length among them replaces the server's own, and the connection is closed after
it), and text:<payload> (a normal 200 answer whose text is the payload, verbatim: any size, any characters,
colons and newlines included).

`script(..., when=...)` aims faults at the requests a predicate of the JSON body accepts (one order's
coding calls, say); the other requests pass them by.

Rate limit (`rate_limit_rpm`, `--rate-limit-rpm`, or POST /_fake/configure {"rate_limit_rpm": N}; 0: off):
like a real provider, at most N requests are answered in any 60 s sliding window; beyond, the answer
is 429 with `Retry-After` (whole seconds), `retry-after-ms` and `x-ratelimit-limit-requests`,
`x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests` headers saying when the oldest
answered request leaves the window. Only answered requests count; such a request is recorded with
fault `rate-limited:<ms>`. Scripted faults come first and are not counted."""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Self, cast
from urllib.parse import urlsplit

from worker.ai.parsing import extract_input
from worker.local import offline_edits
from worker.local.offline_site import offline_code, offline_content, offline_plan
from worker.models import Brief, SiteContent, SitePlan

APIS = ("openai", "anthropic", "cloudflare")
SIMPLE_FAULTS = frozenset(
    {"ok", "hang", "reset", "close", "truncated", "malformed", "malformed-hard", "fenced", "wrong-schema", "cf-quota"}
)
#: The fault recorded for a request refused by the rate limit (`rate-limited:<ms until a request may pass>`).
RATE_LIMITED = "rate-limited"
#: How long a `hang` holds a request when the server is not stopped first.
HANG_S = 300.0
CF_QUOTA_MESSAGE = (
    "Capacity temporarily exceeded, please try again. You have used up your daily free allocation of 10,000 neurons."
)
#: `text:<payload>` answers 200 with the payload as the model's text, verbatim.
TEXT_PREFIX = "text:"
WRONG_SCHEMA_TEXT = '{"unexpected": "shape", "pages": "not a list"}'
MALFORMED_HARD_TEXT = '{"pages": [<<<not json>>>'
#: The body of a `junk:<status>` answer: what a broken proxy or a crashing provider sends back.
JUNK_BODY = (
    b"\x00\x00<html>\x00Internal Server Error\xff\xfe\x00\x1b[31m\x07\x08 \\u0000 \xc3\x28 \xed\xa0\x80"
    b'\r\n\x00{"error": "\x00"}\x00\x7f\xc0\xaf</html>\x00'
)

_CLOUDFLARE_PATH = re.compile(r"/accounts/(?P<account>[^/]+)/ai/run/(?P<model>.+)$")

# status -> (openai type, anthropic type, message)
_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request_error", "invalid request"),
    401: ("invalid_request_error", "authentication_error", "invalid api key"),
    403: ("permission_error", "permission_error", "your api key does not have permission to use this resource"),
    404: ("invalid_request_error", "not_found_error", "the requested resource was not found"),
    413: ("invalid_request_error", "request_too_large", "request too large"),
    422: ("invalid_request_error", "invalid_request_error", "the request could not be processed"),
    429: ("rate_limit_error", "rate_limit_error", "rate limit exceeded, please slow down"),
    500: ("server_error", "api_error", "internal server error"),
    502: ("server_error", "api_error", "bad gateway"),
    503: ("server_error", "api_error", "service unavailable"),
    529: ("server_error", "overloaded_error", "overloaded"),
}
_OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 404: "model_not_found"}
_CLOUDFLARE_CODES = {401: 10000, 403: 10000, 429: 3040}


@dataclass(frozen=True)
class RecordedRequest:
    at: float  # time.monotonic() when the request arrived
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON (or None)
    api: str  # "openai" | "anthropic" | "cloudflare" | "control" | "unknown"
    fault: str  # the behaviour applied ("ok", "429:2", "text:...", ...)
    wall: float = 0.0  # time.time() when the request arrived (to line up with other processes' clocks)


def validate_fault(fault: str) -> str:
    """`fault` itself when it names a known behaviour; ValueError saying what is wrong otherwise."""
    if fault in SIMPLE_FAULTS or fault.startswith(TEXT_PREFIX):
        return fault
    kind, sep, arg = fault.partition(":")
    try:
        if sep and kind == "delay" and float(arg) >= 0:
            return fault
        # Retry-After is sent verbatim, whatever it says: only what cannot be a header value is refused.
        if sep and kind == "429" and arg.strip() and not any(c in arg for c in "\r\n\x00"):
            return fault
        if sep and kind == "429ms":
            float(arg)  # inf, nan and negative numbers too: a hostile provider's values
            return fault
        if sep and kind == "body" and 300 <= int(arg.partition(":")[0]) <= 599:
            return fault
        if sep and kind == "headers":
            _scripted_headers(arg)
            return fault
        if sep and kind == "status" and 300 <= int(arg) <= 599:
            return fault
        if sep and kind == "junk" and 400 <= int(arg) <= 599:
            return fault
    except ValueError:
        pass
    raise ValueError(
        f"unknown fault {fault!r}; expected one of {', '.join(sorted(SIMPLE_FAULTS))}, "
        "delay:<s>, status:<300-599>, junk:<400-599>, 429:<value>, 429ms:<ms>, body:<status>:<raw text>, "
        "headers:<status>:<JSON object of header values>, text:<answer text>"
    )


def _scripted_headers(arg: str) -> tuple[int, dict[str, str]]:
    """(status, headers) of a `headers:<status>:<JSON object>` fault; ValueError for what HTTP cannot carry."""
    code, _, raw = arg.partition(":")
    status = int(code)
    if not (status == 200 or 400 <= status <= 599):
        raise ValueError(f"headers:<status>: {status} is not 200 or a 4xx/5xx status")
    headers = json.loads(raw)
    if not isinstance(headers, dict):
        raise ValueError("headers:<status>:<JSON object>: not an object")
    for name, value in headers.items():
        if not isinstance(value, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ValueError(f"header {name!r}: a name must be an HTTP token and its value a string")
        if any(c in value for c in "\r\n\x00"):
            raise ValueError(f"header {name!r}: a value cannot hold CR, LF or NUL")
        value.encode("latin-1")  # what http.server sends header values as (UnicodeEncodeError is a ValueError)
    return status, headers


def _api_of(path: str) -> str:
    if path.startswith("/_fake/"):
        return "control"
    if _CLOUDFLARE_PATH.search(path):
        return "cloudflare"
    if path.endswith("/chat/completions"):
        return "openai"
    if path.endswith("/messages"):
        return "anthropic"
    return "unknown"


def _text_of(content: Any) -> str:
    """A message's text: a plain string or a list of `{"type": "text", "text": ...}` blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(block.get("text", "")) if isinstance(block, dict) else str(block) for block in content)
    return "" if content is None else str(content)


def _tokens(chars: int) -> int:
    return max(1, chars // 4)


def answer_for(prompt: str) -> str:
    """The offline model's answer (JSON text) to a prompt rendered from the project's templates."""
    if "<input>" not in prompt or "</input>" not in prompt:
        return '{"ok": true}'
    inputs = extract_input(prompt)
    edited = offline_edits.answer(inputs)
    if edited is not None:
        return edited
    if "content" in inputs:
        plan = SitePlan.model_validate(inputs["plan"])
        return offline_code(plan, SiteContent.model_validate(inputs["content"])).model_dump_json()
    brief = Brief.model_validate(inputs["brief"])
    if "plan" in inputs:
        return offline_content(brief, SitePlan.model_validate(inputs["plan"])).model_dump_json()
    return offline_plan(brief).model_dump_json()


def malformed(text: str) -> str:
    """`text` (a JSON object) with a defect json-repair fixes: the final `}` replaced by a trailing comma."""
    text = text.rstrip()
    return text[:-1] + "," if text.endswith("}") else text + ","


def fenced(text: str) -> str:
    return f"Here is the JSON you asked for:\n```json\n{text}\n```\nLet me know if you need changes."


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops connections under load tests

    def __init__(self, address: tuple[str, int], owner: FakeProviderServer) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | ValueError):  # clients hanging up, sockets closed by stop()
            return
        super().handle_error(request, client_address)


class _Reply(Exception):
    """Raised inside the handler to answer at once (used for bad requests)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeProvider/1.0"
    sys_version = ""

    @property
    def fake(self) -> FakeProviderServer:
        return cast(_HTTPServer, self.server).owner

    # ----------------------------------------------------------------- plumbing

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm meets delayed ACKs.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = cast(_HTTPServer, self.server)
        with server.connections_lock:
            server.connections.add(self.connection)

    def finish(self) -> None:
        server = cast(_HTTPServer, self.server)
        with server.connections_lock:
            server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _read_body(self) -> tuple[bytes, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw:
            return raw, None
        try:
            return raw, json.loads(raw)
        except ValueError:
            return raw, None

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
        given = {name.lower() for name in headers or {}}  # a scripted Content-Type or -Length replaces ours
        self.send_response(status)
        if "content-type" not in given:
            self.send_header("Content-Type", "application/json")
        if "content-length" not in given:
            self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_raw(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _drop(self, *, reset: bool) -> None:
        """End the connection without an answer: a TCP reset (RST) or an ordinary close."""
        self.close_connection = True
        if reset:
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        # The socket is only really closed once the buffered reader made from it is closed too.
        self.connection.close()
        self.rfile.close()

    # ----------------------------------------------------------------- entry points

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        at, wall = time.monotonic(), time.time()
        _, body = self._read_body()
        path = urlsplit(self.path).path
        api = _api_of(path)
        if api == "control":
            try:
                status, answer = self.fake._control(self.command, path, body)
            except (ValueError, TypeError) as exc:
                status, answer = 400, {"error": str(exc)}
            self._send(status, answer)
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        if api == "unknown" or self.command != "POST":
            self.fake._record(RecordedRequest(at, self.command, self.path, headers, body, api, "not-found", wall))
            self._send(404, {"error": {"message": f"no route for {self.command} {path}", "type": "not_found"}})
            return
        fault = self.fake._next_fault(api, body, at)
        n = self.fake._record(RecordedRequest(at, self.command, self.path, headers, body, api, fault, wall))
        self._answer(api, path, body, fault, n)

    # ----------------------------------------------------------------- provider answers

    def _answer(self, api: str, path: str, body: Any, fault: str, n: int) -> None:
        stopping = self.fake._stopping
        if fault == "hang":
            stopping.wait(HANG_S)
            self._drop(reset=False)
            return
        latency = 0.0 if fault.startswith(RATE_LIMITED) else self.fake._latency()  # refused at once, as providers do
        if latency > 0 and stopping.wait(latency):
            self._drop(reset=False)
            return
        if fault in ("reset", "close"):
            self._drop(reset=fault == "reset")
            return
        if fault.startswith("delay:") and stopping.wait(float(fault.partition(":")[2])):
            self._drop(reset=False)
            return
        id_headers = {
            "openai": {"x-request-id": f"req_{n}"},
            "anthropic": {"request-id": f"req_{n}"},
            "cloudflare": {"cf-ray": f"{n}-FAKE"},
        }[api]
        if fault.startswith("body:"):
            code, _, raw = fault[len("body:") :].partition(":")
            self._send_raw(int(code), raw.encode("utf-8", "surrogatepass"), id_headers)
            return
        if fault.startswith("headers:"):
            asked, scripted = _scripted_headers(fault[len("headers:") :])
            if asked == 200:
                sent, answer, extra = self._build(api, path, body, "ok", n)
            else:
                sent, answer, extra = asked, _error_body(api, asked), {}
            self.close_connection = True  # a hostile Content-Length must not spill into the next answer
            self._send(sent, answer, {**id_headers, **extra, "Connection": "close", **scripted})
            return
        try:
            status, answer, extra = self._build(api, path, body, fault, n)
        except _Reply as reply:
            status, answer, extra = reply.status, reply.body, {}
        self._send(status, answer, {**id_headers, **extra})

    def _build(self, api: str, path: str, body: Any, fault: str, n: int) -> tuple[int, Any, dict[str, str]]:
        scripted_text = fault.startswith(TEXT_PREFIX)
        kind, arg = "text", ""  # a text payload may be tens of megabytes: sliced once, below
        if not scripted_text:
            kind, _, arg = fault.partition(":")
        if fault == "cf-quota":
            return 429, _cloudflare_error(3036, CF_QUOTA_MESSAGE), {}
        if kind == "status":
            moved = {"Location": f"/moved{path}"} if int(arg) < 400 else {}
            return int(arg), _error_body(api, int(arg)), moved
        if kind == "junk":
            return int(arg), JUNK_BODY, {}
        if kind == "429":
            return 429, _error_body(api, 429), {"Retry-After": arg}
        if kind == "429ms":
            return 429, _error_body(api, 429), {"retry-after-ms": arg}
        if kind == RATE_LIMITED:
            wait_ms = float(arg)
            return (
                429,
                _error_body(api, 429),
                {
                    "Retry-After": str(max(math.ceil(wait_ms / 1000), 1)),
                    "retry-after-ms": f"{wait_ms:.0f}",
                    "x-ratelimit-limit-requests": str(self.fake.rate_limit_rpm),
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": f"{wait_ms / 1000:.3f}s",
                },
            )

        if not isinstance(body, dict):
            raise _Reply(400, _error_body(api, 400, "the request body must be a JSON object"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Reply(400, _error_body(api, 400, "'messages' must be a non-empty list"))
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise _Reply(400, _error_body(api, 400, "'messages' must hold a user message"))
        prompt = _text_of(users[-1].get("content"))
        chars = sum(len(_text_of(m.get("content"))) for m in messages if isinstance(m, dict))
        chars += len(_text_of(body.get("system")))
        if scripted_text:
            text = fault[len(TEXT_PREFIX) :]
        else:
            try:
                text = answer_for(prompt)
            except Exception as exc:
                message = f"the fake provider could not read the prompt's <input> block: {exc}"
                raise _Reply(400, _error_body(api, 400, message[:2000])) from exc

        stop = True
        if fault == "truncated":
            text, stop = text[: len(text) // 2], False
        elif fault == "malformed":
            text = malformed(text)
        elif fault == "malformed-hard":
            text = MALFORMED_HARD_TEXT
        elif fault == "fenced":
            text = fenced(text)
        elif fault == "wrong-schema":
            text = WRONG_SCHEMA_TEXT
        p, c = _tokens(chars), _tokens(len(text))

        if api == "openai":
            return (
                200,
                {
                    "id": f"chatcmpl-{n}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": str(body.get("model", "fake-model")),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop" if stop else "length",
                        }
                    ],
                    "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
                },
                {},
            )
        if api == "anthropic":
            return (
                200,
                {
                    "id": f"msg_{n}",
                    "type": "message",
                    "role": "assistant",
                    "model": str(body.get("model", "fake-model")),
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn" if stop else "max_tokens",
                    "stop_sequence": None,
                    "usage": {"input_tokens": p, "output_tokens": c},
                },
                {},
            )
        return (
            200,
            {
                "result": {
                    "response": text,
                    "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
                },
                "success": True,
                "errors": [],
                "messages": [],
            },
            {},
        )


def _accepts(when: Callable[[Any], bool], body: Any) -> bool:
    try:
        return bool(when(body))
    except Exception:
        return False


def _latency_rng(seed: int) -> random.Random:
    """The latency draws' own generator, so turning latency on does not change which requests fail."""
    return random.Random(f"latency:{seed}")


def _cloudflare_error(code: int, message: str) -> dict[str, Any]:
    return {"result": None, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


def _error_body(api: str, status: int, message: str | None = None) -> dict[str, Any]:
    """The provider's error body for an HTTP status."""
    openai_type, anthropic_type, default = _ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error",) * 2 + (f"error {status}",)
    )
    message = message or default
    if api == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type, "message": message}}
    if api == "cloudflare":
        return _cloudflare_error(_CLOUDFLARE_CODES.get(status, status), message)
    return {"error": {"message": message, "type": openai_type, "code": _OPENAI_CODES.get(status)}}


class FakeProviderServer:
    """The fake provider, served from a background thread; use as a context manager or start()/stop()."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency_s: float = 0.0,
        latency_max_s: float = 0.0,
        rate_429: float = 0.0,
        rate_500: float = 0.0,
        seed: int = 0,
        tls: ssl.SSLContext | None = None,
        rate_limit_rpm: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        #: A server-side context: serve HTTPS with its certificate (tests of certificate checks).
        self.tls = tls
        self.latency_s = latency_s
        #: Above `latency_s`: each answer waits uniform(latency_s, latency_max_s) instead (seeded).
        self.latency_max_s = latency_max_s
        self.rate_429 = rate_429
        self.rate_500 = rate_500
        self.seed = seed
        #: Most requests answered in any 60 s window; beyond, 429 with Retry-After (0: no limit).
        self.rate_limit_rpm = rate_limit_rpm
        self._answered: collections.deque[float] = collections.deque()
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._recorded = threading.Condition(self._lock)
        self._script: list[tuple[str, str | None, Callable[[Any], bool] | None]] = []
        self._counter = 0
        self._random = random.Random(seed)
        self._latency_random = _latency_rng(seed)
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the fake provider is not started")
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host!s}:{port}"

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("the fake provider is already started")
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self.port), self)
        if self.tls is not None:  # the handshake runs at accept; a client that rejects the certificate is dropped
            self._httpd.socket = self.tls.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-provider", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: hanging and delayed requests are released and open connections closed."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with httpd.connections_lock:
            connections = list(httpd.connections)
        for conn in connections:  # wakes handlers waiting for the next request on a kept-alive connection
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- control

    def script(self, *faults: str, api: str | None = None, when: Callable[[Any], bool] | None = None) -> None:
        """Queue behaviours for the next API requests, one request each, in order: only `api`'s requests, if
        given, and only those whose parsed JSON body `when` accepts, if given (in-process use only; a
        predicate that raises counts as a no)."""
        if api is not None and api not in APIS:
            raise ValueError(f"unknown api {api!r}; expected one of {', '.join(APIS)}")
        checked = [validate_fault(f) for f in faults]
        with self._lock:
            self._script.extend((f, api, when) for f in checked)

    def configure(
        self,
        *,
        latency_s: float | None = None,
        latency_max_s: float | None = None,
        rate_429: float | None = None,
        rate_500: float | None = None,
        seed: int | None = None,
        rate_limit_rpm: int | None = None,
    ) -> None:
        if rate_limit_rpm is not None and (isinstance(rate_limit_rpm, bool) or not int(rate_limit_rpm) >= 0):
            raise ValueError(f"rate_limit_rpm must be a whole number >= 0, got {rate_limit_rpm!r}")
        for name, value in (("latency_s", latency_s), ("latency_max_s", latency_max_s)):
            if value is not None and not float(value) >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        with self._lock:
            if latency_s is not None:
                self.latency_s = float(latency_s)
            if latency_max_s is not None:
                self.latency_max_s = float(latency_max_s)
            if rate_429 is not None:
                self.rate_429 = float(rate_429)
            if rate_500 is not None:
                self.rate_500 = float(rate_500)
            if rate_limit_rpm is not None:
                self.rate_limit_rpm = int(rate_limit_rpm)
                self._answered.clear()
            if seed is not None:
                self.seed = int(seed)
                self._random = random.Random(self.seed)
                self._latency_random = _latency_rng(self.seed)

    def reset(self) -> None:
        """Forget the script, the recorded requests and the counters (the random faults start over)."""
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self._answered.clear()
            self._counter = 0
            self._random = random.Random(self.seed)
            self._latency_random = _latency_rng(self.seed)

    def pending_script(self) -> list[tuple[str, str | None]]:
        """The script entries not used yet, as (fault, api)."""
        with self._lock:
            return [(fault, api) for fault, api, _ in self._script]

    def wait_for_requests(self, n: int, timeout: float = 10) -> list[RecordedRequest]:
        """The recorded requests once there are at least `n`; TimeoutError after `timeout` seconds."""
        with self._recorded:
            if not self._recorded.wait_for(lambda: len(self.requests) >= n, timeout=timeout):
                raise TimeoutError(f"the fake provider got {len(self.requests)} requests, not {n}, in {timeout} s")
            return list(self.requests)

    # ----------------------------------------------------------------- used by the handler

    def _latency(self) -> float:
        """How long the next answer waits: latency_s, or uniform(latency_s, latency_max_s) when that is larger."""
        with self._lock:
            low, high = self.latency_s, self.latency_max_s
            if high > low:
                return self._latency_random.uniform(low, high)
            return low

    def _next_fault(self, api: str, body: Any = None, at: float | None = None) -> str:
        with self._lock:
            for i, (fault, only, when) in enumerate(self._script):
                if (only is None or only == api) and (when is None or _accepts(when, body)):
                    del self._script[i]
                    return fault
            if self.rate_limit_rpm > 0:
                now = time.monotonic() if at is None else at
                window = self._answered
                while window and window[0] <= now - 60.0:
                    window.popleft()
                if len(window) >= self.rate_limit_rpm:
                    return f"{RATE_LIMITED}:{(window[0] + 60.0 - now) * 1000:.0f}"
                window.append(now)
            if self.rate_429 > 0 and self._random.random() < self.rate_429:
                return "429:1"
            if self.rate_500 > 0 and self._random.random() < self.rate_500:
                return "status:500"
            return "ok"

    def _record(self, request: RecordedRequest) -> int:
        """Record an API request; returns its number (1, 2, ...)."""
        with self._recorded:
            self.requests.append(request)
            self._counter += 1
            self._recorded.notify_all()
            return self._counter

    def _control(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        args = body if isinstance(body, dict) else {}
        if method == "GET" and path == "/_fake/requests":
            with self._lock:
                return 200, [asdict(r) for r in self.requests]
        if method == "GET" and path == "/_fake/health":
            return 200, {"ok": True}
        if method == "GET" and path == "/_fake/count":  # API requests received, without their bodies
            with self._lock:
                return 200, {"requests": self._counter}
        if method == "POST" and path == "/_fake/script":
            faults = args.get("faults", [])
            if not isinstance(faults, list) or not all(isinstance(f, str) for f in faults):
                raise ValueError("'faults' must be a list of strings")
            # `repeat` queues the list that many times without sending a big `text:` payload again.
            repeat = args.get("repeat", 1)
            if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= 10_000:
                raise ValueError("'repeat' must be an integer from 1 to 10000")
            self.script(*(faults * repeat), api=args.get("api"))
            return 200, {"ok": True, "queued": len(faults) * repeat}
        if method == "POST" and path == "/_fake/configure":
            unknown = sorted(
                set(args) - {"latency_s", "latency_max_s", "rate_429", "rate_500", "seed", "rate_limit_rpm"}
            )
            if unknown:
                raise ValueError(f"unknown settings: {', '.join(unknown)}")
            self.configure(**args)
            return 200, {"ok": True}
        if method == "POST" and path == "/_fake/reset":
            self.reset()
            return 200, {"ok": True}
        return 404, {"error": f"no control route for {method} {path}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.local.fake_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added before every answer")
    parser.add_argument(
        "--latency-max",
        type=float,
        default=0.0,
        help="when above --latency: each answer waits a random (seeded) time between the two",
    )
    parser.add_argument("--rate-429", type=float, default=0.0, help="share of requests answered 429")
    parser.add_argument("--rate-500", type=float, default=0.0, help="share of requests answered 500")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rate-limit-rpm",
        type=int,
        default=0,
        help="answer at most this many requests in any 60 s window, 429 with Retry-After beyond (0: no limit)",
    )
    args = parser.parse_args(argv)
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    handler: Callable[[int, FrameType | None], None] = _stop
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    server = FakeProviderServer(
        args.host,
        args.port,
        latency_s=args.latency,
        latency_max_s=args.latency_max,
        rate_429=args.rate_429,
        rate_500=args.rate_500,
        seed=args.seed,
        rate_limit_rpm=args.rate_limit_rpm,
    ).start()
    try:
        print(f"FAKE_PROVIDER_URL={server.url}", flush=True)
        while not done.wait(0.5):
            pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
