"""Pieces every server app shares: OpenAI-shaped error handlers, JSON bodies, waitress startup."""
from __future__ import annotations

import logging

from ds_vicuna.serve.schemas import APIError, ErrorCode, parse_json_body

log = logging.getLogger("ds_vicuna.serve")


def install_error_handlers(app) -> None:
    """Every error, ours or Flask's (404, 405, 413), answers in OpenAI's error shape; tracebacks stay in the log."""
    from flask import jsonify
    from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

    def respond(err: APIError):
        return jsonify(err.body()), err.code.status

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


def json_body(request) -> dict:
    """The request's JSON object body (raises APIError otherwise; 413 past MAX_CONTENT_LENGTH)."""
    return parse_json_body(request.get_data(cache=True))


def make_server(app, host: str, port: int, threads: int):
    """A waitress server bound now (port 0 picks a free one); call `.run()` to serve and `.close()` to stop."""
    from waitress.server import create_server

    # send_bytes=1: flush each streamed chunk at once instead of waiting for 18 kB of output.
    return create_server(app, host=host, port=port, threads=threads, send_bytes=1, ident="ds-vicuna",
                         channel_timeout=300, connection_limit=max(100, threads * 4))


def server_url(server, host: str) -> str:
    return f"http://{host}:{server.effective_port}"
