"""The request guard: one ASGI layer in front of every route of the server (the app's and MONAI
Label's), installed in place of MONAI Label's CORS middleware, which allowed every origin with
credentials.

Before any route code runs it checks, in this order:
0. the client: this machine, or a network the operator named (--conf allowed_clients);
1. Host: an IP address, localhost, this machine's name or a name the operator allowed (a web page
   that re-points its own DNS name at this machine is refused: DNS rebinding);
2. Origin: a browser request from an origin the operator did not name (--conf cors_origins) is
   refused with 403 before it can act; preflights of named origins are answered by Starlette's
   CORSMiddleware without credentials;
3. the route: deny by default (lib/rules.py lists every route served and why others are refused);
4. the query string: every parameter known, once, and of its type (ids and tags are names);
5. the body: its content type, and its size, counted as it arrives (413 past the route's limit).

And after: any exception a route raises becomes one JSON answer `{"detail": "..."}`: a client's
mistake (lib/errors.py maps the types) a 4xx, anything else a 500 without a traceback; each is
logged once, as one line (5xx with the traceback, in the server log only).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from urllib.parse import parse_qsl

from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from msa.errors import MSAError

from .errors import BadRequest, Forbidden, PayloadTooLarge, UnsupportedFile, message_of, status_of
from .policy import Policy
from .rules import Rule, find_rule

logger = logging.getLogger(__name__)
NO_BODY_LIMIT = 64 * 1024  # requests that take no body: headers-sized at most
CORS_METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE")
CORS_HEADERS = ("Authorization", "Content-Type", "Accept")


class RequestGuard:
    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.policy = policy
        # Named origins only, never credentials: with a "*" that would hand any site the user's session.
        self.app = CORSMiddleware(app, allow_origins=list(policy.cors_origins), allow_credentials=False,
                                  allow_methods=list(CORS_METHODS), allow_headers=list(CORS_HEADERS),
                                  max_age=600) if policy.cors_origins else app
        self.redactions = {str(policy.studies): "<studies>", os.path.realpath(tempfile.gettempdir()): "<tmp>"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        allowed_origin = None
        try:
            allowed_origin = self._check_origin(scope, headers)
            if scope["method"] == "OPTIONS":  # a preflight of a named origin: CORSMiddleware answers it
                if allowed_origin is None:
                    raise BadRequest("OPTIONS is only answered to CORS preflights of allowed origins")
                await self.app(scope, receive, send)
                return
            rule, _ = self._check_route(scope, headers)
        except Exception as error:
            await self._answer(scope, send, error, allowed_origin)
            return
        await self._run(scope, receive, send, self._limit(rule), allowed_origin)

    # -- before the route -------------------------------------------------------------------------

    def _check_origin(self, scope: Scope, headers: Headers) -> str | None:
        """The request's Origin if the operator allowed it; None for same-origin and non-browser
        clients (no Origin header); Forbidden for any other browser origin."""
        client = scope.get("client")
        if not self.policy.client_allowed(client[0] if client else None):
            raise Forbidden("this server answers clients on its own machine only; to serve other machines, "
                            "start it with --conf allowed_clients <network> behind a reverse proxy with TLS "
                            "and authentication")
        host = headers.get("host", "")
        if not self.policy.host_allowed(host):
            raise BadRequest(f"host {host[:80]!r} is not served: reach the server by its IP address or "
                             f"localhost, or start it with --conf allowed_hosts <name>")
        origin = headers.get("origin")
        fetch_site = headers.get("sec-fetch-site", "")
        if origin is None:
            # A browser's no-cors request made by a page of another site (an <img>, a <form>) carries
            # no Origin; a person following a link to the API docs is a harmless navigation.
            navigation = scope["method"] in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate"
            if fetch_site in ("cross-site", "same-site") and not navigation:
                raise Forbidden("cross-site browser request refused (no CORS origin allowed)")
            return None
        if origin != "null" and self.policy.origin_allowed(origin):
            return origin
        if origin.split("://", 1)[-1].lower() == host.lower() and fetch_site not in ("cross-site", "same-site"):
            return None  # this server's own pages (the API docs at /)
        hint = "" if self.policy.cors_origins else " (this server allows no browser origins; see --conf cors_origins)"
        raise Forbidden(f"cross-origin request from {origin[:100]!r} refused{hint}")

    def _check_route(self, scope: Scope, headers: Headers) -> tuple[Rule, dict[str, str]]:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # served under a prefix (uvicorn --root_path, behind a proxy)
            path = path[len(root):] or "/"
        rule, path_params = find_rule(scope["method"], path)
        if rule.refused is not None:
            kind, reason = rule.refused
            raise kind(reason)
        rule.check_path(path_params)
        try:
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True,
                              encoding="utf-8", errors="strict", max_num_fields=64)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the query string does not decode (UTF-8, at most 64 parameters)") from None
        seen = set()
        for key, value in query:
            if key not in rule.query:
                known = ", ".join(rule.query) or "none"
                raise MSAError(f"unknown query parameter {key[:40]!r} for {rule.method} {rule.template} "
                               f"(it takes: {known})")
            if key in seen:
                raise MSAError(f"query parameter {key!r} given twice")
            seen.add(key)
            rule.query[key].check(key, value)
        for key, param in rule.query.items():
            if param.required and key not in seen:
                raise MSAError(f"query parameter {key!r} is required")
        self._check_body_headers(rule, headers)
        return rule, path_params

    def _check_body_headers(self, rule: Rule, headers: Headers) -> None:
        length = headers.get("content-length")
        if length is not None and not (length.isascii() and length.isdigit()):
            raise BadRequest(f"Content-Length {length[:20]!r} is not a number of bytes")
        if length is not None and int(length) > self._limit(rule):
            raise PayloadTooLarge(f"request body of {length[:20]} bytes; this route takes at most "
                                  f"{self._limit(rule)} bytes (--conf max_upload_mb for uploads)")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if rule.body == "upload" and content_type != "multipart/form-data":
            raise UnsupportedFile("upload the file as multipart/form-data (field 'file', or 'label' for labels)")

    def _limit(self, rule: Rule) -> int:
        return {"upload": self.policy.max_upload_bytes, "form": self.policy.max_form_bytes}.get(rule.body,
                                                                                                NO_BODY_LIMIT)

    # -- the route, and its errors ----------------------------------------------------------------------

    async def _run(self, scope: Scope, receive: Receive, send: Send, limit: int, origin: str | None) -> None:
        state = {"received": 0, "overflow": False, "started": False}

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["overflow"] = True
                    raise PayloadTooLarge(f"request body over {limit} bytes (--conf max_upload_mb for uploads)")
            return message

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if state["overflow"]:  # the form parser turned our 413 into its own 400: say what it was
                    raise PayloadTooLarge(f"request body over {limit} bytes (--conf max_upload_mb for uploads)")
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception as error:  # not BaseException: a cancelled request must stay cancelled
            if state["started"]:
                logger.error(f"{scope['method']} {scope['path']} failed after its answer began", exc_info=error)
                return
            await self._answer(scope, send, _leaf(error), origin)

    async def _answer(self, scope: Scope, send: Send, error: BaseException, origin: str | None) -> None:
        if isinstance(error, RequestValidationError):
            status, message = 422, _validation_message(error)
        else:
            status, message = status_of(error), message_of(error)
        line = f"{scope['method']} {scope['path']}"
        if status is None:
            logger.error(f"{line}: internal error", exc_info=error)  # the one place a traceback goes
            status, message = 500, "internal server error (see the server log)"
        else:
            logger.warning(f"refused {line} ({status}): {message}")
        for path, shown in self.redactions.items():
            message = message.replace(path, shown)
        body = json.dumps({"detail": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if origin is not None:  # an allowed page must be able to read why it was refused
            headers += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _leaf(error: BaseException) -> BaseException:
    """The first real exception inside anyio's exception groups."""
    while isinstance(getattr(error, "exceptions", None), tuple) and error.exceptions:
        error = error.exceptions[0]
    return error


def _validation_message(error: RequestValidationError) -> str:
    """FastAPI's list of errors, as one line that does not echo the input back."""
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query"))
    return f"{where or 'request'}: {first.get('msg', 'invalid')}"
