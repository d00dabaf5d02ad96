"""The OpenAI-compatible API server's HTTP side: thin Flask handlers over `serving.ChatService`, and the chat page.

    ds-vicuna serve api --controller http://127.0.0.1:21001 --port 8000 [--api-key K ...]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="K")

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as server-sent events
ending `data: [DONE]`), GET /health (200 only while a worker is registered; "degraded" while the controller is
unreachable), GET /metrics (Prometheus text format; needs an API key when keys are set), GET / (the chat page).
The app comes from `create_app(APIConfig(...))`; the request logic is `serve.serving`, routing to workers with
failover `serve.routing`.
"""
from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ds_vicuna.serve.admission import DEFAULT_MAX_JOBS_PER_REQUEST, DEFAULT_MAX_RUNNING_REQUESTS, Admission
from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.http_util import install_error_handlers, json_body
from ds_vicuna.serve.metrics import ServingMetrics, install_metrics
from ds_vicuna.serve.moderation import Moderator
from ds_vicuna.serve.openai_protocol import model_list
from ds_vicuna.serve.routing import Upstream, pooled_session
from ds_vicuna.serve.serving import ChatService

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class APIConfig:
    """Settings of the API server.

    Attributes:
        controller: the controller's URL.
        api_keys: accepted Bearer keys; empty means no authentication (only on a trusted host).
        max_content_length: request body limit in bytes (413 above it).
        max_attempts: workers tried per choice before giving up.
        moderator: the input filter (inactive by default).
        worker_secret: sent to the controller and workers (`X-Worker-Secret`), which refuse calls without it.
        model_memory: seconds a model stays "served a moment ago": asked for while no worker serves it (a
            controller restart, a worker restarting), it is a 503 the client retries, not a 404.
        max_jobs_per_request: most jobs (prompts x n) in one request; more is a 400 naming the limit.
        max_running_requests: generation requests in flight at once; one more is a 429 at once. The server needs
            more threads than this (`serve.cli` gives it 16 more), so health checks and refusals are always answered.
    """

    controller: str
    api_keys: tuple[str, ...] = ()
    max_content_length: int = 1024 * 1024
    max_attempts: int = 3
    moderator: Moderator = field(default_factory=Moderator)
    worker_secret: str | None = None
    model_memory: float = 120.0
    max_jobs_per_request: int = DEFAULT_MAX_JOBS_PER_REQUEST
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS


def create_app(config: APIConfig, http=None, clock: Callable[[], float] = time.monotonic):
    """The API server's Flask app.

    Args:
        config: the server settings.
        http: the HTTP client for controller and workers (default: a pooled keep-alive `requests.Session`).
        clock: returns seconds (monotonic), for the model memory and metrics.
    """
    from flask import Flask, Response, jsonify, request, send_from_directory, stream_with_context

    if http is None:
        http = pooled_session(config.max_running_requests + 16)
    upstream = Upstream(config.controller, http, config.max_attempts, config.worker_secret, config.model_memory,
                        clock)
    metrics = ServingMetrics(clock=clock)
    admission = Admission(config.max_jobs_per_request, config.max_running_requests)
    metrics.gauge("ds_vicuna_queue_depth", "Jobs admitted here still waiting for their first token",
                  lambda: admission.counts.waiting)
    metrics.gauge("ds_vicuna_running_jobs", "Jobs streaming tokens through this server",
                  lambda: admission.counts.running)
    metrics.gauge("ds_vicuna_running_requests", "Generation requests in flight", admission.running_requests)
    metrics.gauge("ds_vicuna_queue_limit", "Generation requests in flight before a 429",
                  lambda: admission.max_running_requests)
    service = ChatService(config.moderator, upstream, metrics, admission)
    keys = [k.encode() for k in config.api_keys]
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_content_length
    install_error_handlers(app, metrics)
    install_metrics(app, metrics)

    @app.before_request
    def authenticate():
        if not keys or not (request.path.startswith("/v1/") or request.path == "/metrics"):
            return None
        given = request.headers.get("Authorization", "")
        token = given[len("Bearer "):].strip().encode() if given.startswith("Bearer ") else b""
        if not any(hmac.compare_digest(token, key) for key in keys):
            raise APIError(ErrorCode.INVALID_API_KEY, "missing or invalid API key: send 'Authorization: Bearer "
                           "<key>'" if token == b"" else "invalid API key")
        return None

    def respond(result):
        if isinstance(result, dict):
            return jsonify(result)
        return Response(stream_with_context(result), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def disconnected() -> Callable[[], bool]:
        """waitress tells whether the client went away (only with channel_request_lookahead > 0)."""
        return request.environ.get("waitress.client_disconnected") or (lambda: False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return respond(service.chat(json_body(request), disconnected()))

    @app.post("/v1/completions")
    def completions():
        return respond(service.completion(json_body(request), disconnected()))

    @app.get("/v1/models")
    def models():
        return jsonify(model_list(upstream.models()))

    @app.get("/health")
    def health():
        try:
            names = upstream.models()
        except APIError as err:
            return jsonify({"status": "unavailable", "reason": err.message}), 503
        if not names:
            return jsonify({"status": "unavailable", "reason": "no worker registered"}), 503
        if not upstream.controller_up:  # still serving: requests go to the workers last seen
            return jsonify({"status": "degraded", "reason": "the controller is unreachable", "models": names})
        return jsonify({"status": "ok", "models": names})

    @app.get("/")
    def index():
        return send_from_directory(STATIC_DIR, "index.html")

    return app
