"""Controller: knows which workers serve which models, and sends each request to the least loaded one.

    ds-vicuna serve controller --port 21001 --worker-secret S --heartbeat-expiry 10
    curl -H "X-Worker-Secret: S" http://127.0.0.1:21001/          # the status table

Workers register with their models and a shared secret, then send heartbeats with their queue length and health.
A worker whose last heartbeat is older than `heartbeat_expiry` seconds, or that reports itself unhealthy, is
dropped. Routing picks the worker with the shortest queue; each pick counts one more queued request on that
worker until its next heartbeat, so a burst of requests spreads out instead of piling onto whoever reported the
shortest queue last.

The table lives in memory: a restarted controller answers `exist: false` to heartbeats, workers register again,
and for one `heartbeat_expiry` after its start an unknown model is a 503 (retry) rather than a 404.

Endpoints (all but /health need the worker secret when one is set): POST /register_worker, /heartbeat,
/unregister_worker, /get_worker_address; GET /list_models, /health, /status (JSON), / (an HTML status table).
"""
from __future__ import annotations

import html
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.http_util import install_error_handlers, json_body, require_secret


@dataclass
class WorkerInfo:
    address: str
    models: list[str]
    queue_length: int
    max_queue: int
    last_heartbeat: float
    registered_at: float


class Controller:
    """Worker registry and router; all state behind one lock.

    Args:
        heartbeat_expiry: seconds without a heartbeat after which a worker is dropped.
        secret: the shared secret every caller but /health must present (None: no check; only on a trusted host).
        clock: returns seconds (monotonic); injected so tests control time.
        registration_grace: seconds after start during which an unknown model is NO_WORKER (503), not
            MODEL_NOT_FOUND: every live worker heartbeats, and so registers again, within one expiry (the default).
    """

    def __init__(self, heartbeat_expiry: float = 10.0, secret: str | None = None,
                 clock: Callable[[], float] = time.monotonic, registration_grace: float | None = None):
        if heartbeat_expiry <= 0:
            raise ValueError(f"heartbeat_expiry must be positive, got {heartbeat_expiry}")
        self.heartbeat_expiry = heartbeat_expiry
        self.registration_grace = heartbeat_expiry if registration_grace is None else registration_grace
        self.secret = secret
        self._clock = clock
        self._started = clock()
        self._workers: dict[str, WorkerInfo] = {}
        self._lock = threading.Lock()

    def register(self, address: str, models: Iterable[str], queue_length: int = 0, max_queue: int = 0) -> None:
        now = self._clock()
        with self._lock:
            self._workers[address] = WorkerInfo(address, sorted(set(models)), queue_length, max_queue, now, now)

    def heartbeat(self, address: str, queue_length: int, healthy: bool = True) -> bool:
        """Record a heartbeat; False when the worker is unknown (dropped), so it registers again.

        A worker that reports itself unhealthy (its scheduler died) is dropped at once.
        """
        with self._lock:
            self._expire_locked()
            if not healthy:
                self._workers.pop(address, None)
                return False
            info = self._workers.get(address)
            if info is None:
                return False
            info.queue_length, info.last_heartbeat = queue_length, self._clock()
            return True

    def remove(self, address: str) -> None:
        with self._lock:
            self._workers.pop(address, None)

    def models(self) -> list[str]:
        with self._lock:
            self._expire_locked()
            return sorted({m for w in self._workers.values() for m in w.models})

    def pick_worker(self, model: str, exclude: Iterable[str] = ()) -> str:
        """The address of the least loaded healthy worker serving `model`, not in `exclude`.

        Raises:
            APIError: MODEL_NOT_FOUND when no worker serves it (NO_WORKER during the first `heartbeat_expiry`
                seconds, while workers of a restarted controller register again), NO_WORKER when all serving ones
                are excluded.
        """
        return self.pick(model, exclude)[0]

    def pick(self, model: str, exclude: Iterable[str] = ()) -> tuple[str, list[str]]:
        """`pick_worker`'s address, and every worker serving `model` (the API routes by them if we go down)."""
        excluded = set(exclude)
        with self._lock:
            self._expire_locked()
            serving = [w for w in self._workers.values() if model in w.models]
            if not serving:
                since = self._clock() - self._started
                if since < self.registration_grace:
                    raise APIError(ErrorCode.NO_WORKER, f"the controller started {since:.0f} s ago and workers are "
                                   f"still registering; no worker serves '{model}' yet, retry shortly", "model")
                known = sorted({m for w in self._workers.values() for m in w.models})
                raise APIError(ErrorCode.MODEL_NOT_FOUND, f"the model '{model}' does not exist; available: "
                               f"{', '.join(known) or 'none'}", "model")
            candidates = [w for w in serving if w.address not in excluded]
            if not candidates:
                raise APIError(ErrorCode.NO_WORKER, f"no healthy worker left for model '{model}' "
                               f"(tried {len(excluded)})")
            best = min(candidates, key=lambda w: (w.queue_length, w.address))
            best.queue_length += 1  # until the next heartbeat tells the truth
            return best.address, sorted(w.address for w in serving)

    def status(self) -> list[dict]:
        now = self._clock()
        with self._lock:
            self._expire_locked()
            return [{**asdict(w), "seconds_since_heartbeat": round(now - w.last_heartbeat, 3)}
                    for w in sorted(self._workers.values(), key=lambda w: w.address)]

    def _expire_locked(self) -> None:
        now = self._clock()
        for address in [a for a, w in self._workers.items() if now - w.last_heartbeat > self.heartbeat_expiry]:
            del self._workers[address]


def create_app(controller: Controller, max_content_length: int = 64 * 1024):
    """The controller's Flask app (thin handlers over `controller`)."""
    from flask import Flask, jsonify, request

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_content_length
    install_error_handlers(app)
    require_secret(app, controller.secret)

    @app.post("/register_worker")
    def register_worker():
        body = json_body(request)
        address, models = body.get("worker_address"), body.get("models")
        if not isinstance(address, str) or not address.startswith(("http://", "https://")):
            raise APIError(ErrorCode.INVALID_VALUE, "'worker_address' must be an http(s) URL", "worker_address")
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise APIError(ErrorCode.INVALID_VALUE, "'models' must be a non-empty list of names", "models")
        controller.register(address, models, _int(body, "queue_length"), _int(body, "max_queue"))
        return jsonify({"registered": True})

    @app.post("/heartbeat")
    def heartbeat():
        body = json_body(request)
        healthy = body.get("healthy", True)
        if not isinstance(healthy, bool):
            raise APIError(ErrorCode.INVALID_TYPE, "'healthy' must be a boolean", "healthy")
        known = controller.heartbeat(str(body.get("worker_address")), _int(body, "queue_length"), healthy)
        return jsonify({"exist": known})

    @app.post("/unregister_worker")
    def unregister_worker():
        body = json_body(request)
        controller.remove(str(body.get("worker_address")))
        return jsonify({"removed": True})

    @app.post("/get_worker_address")
    def get_worker_address():
        body = json_body(request)
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(ErrorCode.INVALID_TYPE, "'model' must be a string", "model")
        exclude = body.get("exclude") or []
        address, workers = controller.pick(model, [str(e) for e in exclude])
        return jsonify({"address": address, "workers": workers})

    @app.get("/list_models")
    def list_models():
        return jsonify({"models": controller.models()})

    @app.get("/health")
    def health():
        workers = controller.status()
        return jsonify({"status": "ok", "workers": len(workers)}), 200

    @app.get("/status")
    def status():
        return jsonify({"heartbeat_expiry": controller.heartbeat_expiry, "workers": controller.status()})

    @app.get("/")
    def status_page():
        rows = "".join(f"<tr><td>{html.escape(w['address'])}</td><td>{html.escape(', '.join(w['models']))}</td>"
                       f"<td>{w['queue_length']}</td><td>{w['seconds_since_heartbeat']}</td></tr>"
                       for w in controller.status())
        return (f"<!doctype html><title>ds-vicuna controller</title><h1>Workers</h1><table border=1>"
                f"<tr><th>address</th><th>models</th><th>queue</th><th>s since heartbeat</th></tr>{rows}</table>")

    return app


def _int(body: dict, name: str) -> int:
    value = body.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise APIError(ErrorCode.INVALID_TYPE, f"'{name}' must be a non-negative integer", name)
    return value
