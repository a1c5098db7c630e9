"""The request guard's header checks that no request through uvicorn can reach.

uvicorn's HTTP parser (h11 here) answers a non-numeric Content-Length with its own 400 before any
ASGI app runs, so against the real server such a request never reaches the guard; behind another
ASGI server or a lenient proxy it would. These tests drive the real guard (lib/guard.py, with the
policy the server builds from its --conf) through its ASGI interface, in front of a stand-in route.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import pytest
from app_helpers import APP_DIR

if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from lib.guard import RequestGuard  # noqa: E402
from lib.policy import Policy  # noqa: E402


async def route(scope, receive, send) -> None:
    """Stands for the route behind the guard: reads the body, answers 200."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def call(guard: RequestGuard, method: str, path: str, query: str, headers: dict[str, str]) -> tuple[int, str]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
             "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(), "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}
    asyncio.run(guard(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body.decode()


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> RequestGuard:
    return RequestGuard(route, policy=Policy.from_conf({}, str(tmp_path_factory.mktemp("studies"))))


UPLOAD = ("PUT", "/datastore/image", "image=x")
FORM = ("POST", "/train/msa", "")


@pytest.mark.parametrize("length", ["abc", "12x", "-1", "+5", "1e3", " ", "\xb2"])  # \xb2: '²', a digit to str.isdigit
@pytest.mark.parametrize("where", [UPLOAD, FORM], ids=["upload", "form"])
def test_a_content_length_that_is_not_a_number_is_a_bad_request(guard: RequestGuard, where, length: str):
    method, path, query = where
    status, body = call(guard, method, path, query, {
        "host": "127.0.0.1:8000", "content-type": "multipart/form-data; boundary=x", "content-length": length})
    assert status == 400, (status, body)
    detail = json.loads(body)["detail"]
    assert "Content-Length" in detail and "\n" not in detail, detail


def test_a_numeric_content_length_is_still_bounded(guard: RequestGuard):
    headers = {"host": "127.0.0.1:8000", "content-type": "multipart/form-data; boundary=x"}
    assert call(guard, *FORM, {**headers, "content-length": str(10**12)})[0] == 413
    assert call(guard, *UPLOAD, {**headers, "content-length": "0"})[0] == 200


def test_uvicorn_answers_a_bad_content_length_itself(server_url: str):
    """Through the real server the same request is a 400 too (uvicorn's parser answers first)."""
    host, port = server_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /train/msa HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: abc\r\n\r\n{}")
        answer = sock.recv(4096).decode("latin-1")
    assert answer.startswith("HTTP/1.1 400"), answer[:200]


@pytest.fixture(scope="module")
def server_url(server) -> str:
    return server.url
