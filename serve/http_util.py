"""Pieces every server app shares: OpenAI-shaped error handlers, the worker-secret check, JSON bodies, waitress."""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from typing import Any

from ds_vicuna.serve.errors import APIError, ErrorCode

log = logging.getLogger("ds_vicuna.serve")

SECRET_HEADER = "X-Worker-Secret"
MAX_JSON_DEPTH = 64  # nesting levels a request body may have (OpenAI's own bodies need fewer than 10)


def install_error_handlers(app, metrics=None) -> None:
    """Every error, ours or Flask's (404, 405, 413), answers in OpenAI's error shape; tracebacks stay in the log.

    A 429 or 503 carries `Retry-After`; every 5xx leaves one log line; `metrics` (a `ServingMetrics`) counts
    errors by code.
    """
    from flask import jsonify, request
    from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

    def respond(err: APIError):
        if metrics is not None:
            metrics.errors.labels(err.code.value).inc()
        if err.code.status >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.path, err.code.status, err.code.value,
                        err.message)
        return jsonify(err.body()), err.code.status, err.headers()

    @app.errorhandler(APIError)
    def api_error(err: APIError):
        return respond(err)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        if isinstance(err, RequestEntityTooLarge):
            limit = app.config.get("MAX_CONTENT_LENGTH")
            return respond(APIError(ErrorCode.BODY_TOO_LARGE, f"the request body is larger than {limit} bytes"))
        if isinstance(err, NotFound):
            return respond(APIError(ErrorCode.NOT_FOUND, "no such endpoint"))
        if isinstance(err, MethodNotAllowed):
            return respond(APIError(ErrorCode.METHOD_NOT_ALLOWED, "method not allowed on this endpoint"))
        return jsonify({"error": {"message": err.description, "type": "invalid_request_error", "param": None,
                                  "code": str(err.code)}}), err.code

    @app.errorhandler(Exception)
    def unexpected(err: Exception):
        log.exception("unhandled error")
        return respond(APIError(ErrorCode.INTERNAL, f"internal error: {type(err).__name__}"))


def secret_matches(given: str | None, secret: str | None) -> bool:
    """True when no secret is set, or `given` is it (compared in constant time)."""
    return secret is None or hmac.compare_digest((given or "").encode(), secret.encode())


def given_secret(request) -> str | None:
    """The worker secret a request carries: `X-Worker-Secret: S`, or `Authorization: Bearer S` (Prometheus)."""
    header = request.headers.get(SECRET_HEADER)
    if header is not None:
        return header
    auth = request.headers.get("Authorization", "")
    return auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else None


def require_secret(app, secret: str | None, public: tuple[str, ...] = ("/health",)) -> None:
    """Refuse (403) every request to `app` that lacks the worker secret, except the `public` paths."""
    from flask import request

    @app.before_request
    def check_secret():
        if request.path in public or secret_matches(given_secret(request), secret):
            return None
        raise APIError(ErrorCode.INVALID_WORKER_SECRET, f"this endpoint needs the worker secret: send "
                       f"'{SECRET_HEADER}: <secret>'" if given_secret(request) is None else "wrong worker secret")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def json_body(request) -> dict:
    """The request's JSON object body (raises APIError otherwise; 413 past MAX_CONTENT_LENGTH)."""
    return parse_json_body(request.get_data(cache=True))


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object whose every string can be encoded as UTF-8.

    Raises:
        APIError: not JSON, nested deeper than `MAX_JSON_DEPTH`, not an object, or a string holding a lone
            surrogate (`"\\ud800"`), naming where.
    """
    try:
        body = json.loads(raw.decode("utf-8") if raw else "")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(ErrorCode.INVALID_JSON, f"the request body is not valid JSON: {err}") from None
    except RecursionError:  # deeper than the parser's own stack allows
        raise APIError(ErrorCode.INVALID_JSON, f"the request body is nested deeper than {MAX_JSON_DEPTH} "
                       "levels") from None
    if not isinstance(body, dict):
        raise APIError(ErrorCode.INVALID_JSON, f"the request body must be a JSON object, got {type(body).__name__}")
    if _deeper_than(body, MAX_JSON_DEPTH):
        raise APIError(ErrorCode.INVALID_JSON, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
    bad = _unencodable_text(body)
    if bad is not None:
        raise APIError(ErrorCode.INVALID_VALUE, f"'{bad}' holds text that cannot be encoded as UTF-8 (a lone "
                       "surrogate such as \\ud800); send valid Unicode", bad)
    return body


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests objects/arrays more than `limit` levels (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _unencodable_text(value: Any, path: str = "") -> str | None:
    """The path (`messages[0].content`) of the first string or key that is not valid Unicode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            bad = _unencodable_text(key, where) or _unencodable_text(item, where)
            if bad is not None:
                return bad
    elif isinstance(value, list):
        for i, item in enumerate(value):
            bad = _unencodable_text(item, f"{path}[{i}]")
            if bad is not None:
                return bad
    return None


def make_server(app, host: str, port: int, threads: int, connection_limit: int | None = None,
                channel_timeout: int = 300):
    """A waitress server bound now (port 0 picks a free one); call `.run()` to serve and `.close()` to stop.

    Args:
        threads: requests handled at once (a streaming response holds its thread to the end).
        connection_limit: open client connections before the server stops accepting more (they wait in the
            listen backlog); default 4 per thread, at least 100. Sized per role by `serve.cli`.
        channel_timeout: seconds an idle connection (e.g. a pooled keep-alive one) stays open.
    """
    from waitress.server import create_server

    # send_bytes=1: flush each streamed chunk at once instead of waiting for 18 kB of output.
    # channel_request_lookahead: keep reading the socket while the app runs, so a handler can ask
    # environ["waitress.client_disconnected"]() whether its client went away (non-streaming cancel).
    # asyncore_use_poll: poll() has no FD_SETSIZE: select() fails for any descriptor past 1023 ("filedescriptor
    # out of range in select()"), which killed the server loop of a process holding many sockets.
    return create_server(app, host=host, port=port, threads=threads, send_bytes=1, ident="ds-vicuna",
                         channel_timeout=channel_timeout, connection_limit=connection_limit or max(100, threads * 4),
                         channel_request_lookahead=4, asyncore_use_poll=True)


def server_url(server, host: str) -> str:
    return f"http://{host}:{server.effective_port}"
