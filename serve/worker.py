"""Model worker: loads one checkpoint, batches concurrent requests, streams tokens back.

    ds-vicuna serve worker --model PATH|embedded --controller http://127.0.0.1:21001 --port 21002 \
        --worker-secret S [--device cuda:0] [--dtype auto] [--template T] [--max-batch-size 8] [--max-queue 64] \
        [--adapter NAME=PATH ...]

With `--adapter` the base is loaded once and each LoRA adapter is one more model name of this worker: requests
name it in `model`, and rows of different adapters and of the base decode in the same batches, each row with its
own adapter (`serve.multi_lora`).

The model is loaded by `ds_vicuna.model.loading.load_chat_model`, the one loader `eval answer` and the demo use:
device, dtype, template, stop tokens and context length come from there (the template and stops from the
checkpoint's `ds_vicuna.json`; a plain Hugging Face folder uses its own chat template). Prompts are built by
the same encoder that built the training samples; a reply never contains the template's stop string and comes
without the template's leading separator, so a client's history renders the way training rendered it.

A scheduler thread runs `serve.engine.BatchEngine`: between decode steps it admits waiting requests into free
batch slots (up to `max_batch_size` rows decode together), long prompts are prefilled in chunks while the others keep
streaming, and finished rows leave at once. A full queue answers 429; a prompt plus max_tokens beyond the
model's context answers 400. One job's failure is that job's error event; if the scheduler thread dies anyway,
`Worker.healthy` turns False, waiting clients get an error event and new requests are refused.

The worker registers with the controller and heartbeats its queue length and health; a controller that refuses
the secret ends the worker (`RegistrationRefused`), one that forgot it (restarted) gets a new registration.

Endpoints (all but /health need the worker secret when one is set): POST /worker_generate_stream (JSON lines of
`serve.worker_events`), POST /count_tokens, GET /worker_status, /metrics (Prometheus), /health.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Iterator

from ds_vicuna.chat.messages import MessageError, validate_messages
from ds_vicuna.model.loading import ChatModel
from ds_vicuna.serve.engine import BatchEngine
from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.http_util import SECRET_HEADER, install_error_handlers, json_body, require_secret
from ds_vicuna.serve.jobs import GenerationJob, chat_job
from ds_vicuna.serve.metrics import ServingMetrics, install_metrics
from ds_vicuna.serve.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from ds_vicuna.serve.worker_events import DoneEvent, ErrorEvent, Event, TextEvent, is_final, to_line

log = logging.getLogger(__name__)


class RegistrationRefused(RuntimeError):
    """The controller refused this worker (wrong or missing worker secret): retrying cannot help."""


class Worker:
    """Request intake, batching scheduler and controller heartbeats for one ChatModel.

    Nothing runs until `start()`; `stop()` ends the threads.

    Args:
        loaded: the model to serve (`ds_vicuna.model.loading.load_chat_model`).
        address: this worker's URL as the controller should call it.
        controller: the controller's URL, or None to run unregistered (tests).
        http: an object with `post(url, json=..., headers=..., timeout=...)` (e.g. requests.Session).
        max_batch_size: requests decoded together.
        max_queue: waiting + running requests before new ones get 429.
        secret: the controller's worker-registration secret.
        heartbeat_interval: seconds between heartbeats.
        prefill_chunk: prompt tokens prefilled per scheduler step (None: by device; 0: whole prompts).
        adapters: LoRA adapters served over `loaded`'s weights, each its own model name
            (`serve.multi_lora.load_adapter_models`), with `routing` their per-row switch.
    """

    def __init__(self, loaded: ChatModel, address: str, controller: str | None, http, max_batch_size: int = 8,
                 max_queue: int = 64, secret: str | None = None, heartbeat_interval: float = 2.0,
                 prefill_chunk: int | None = None, adapters: list[ChatModel] | tuple = (), routing=None):
        self.loaded = loaded
        self.models = {loaded.name: loaded, **{chat.name: chat for chat in adapters}}
        self.address = address
        self.controller = controller.rstrip("/") if controller else None
        self.http = http
        self.max_queue = max_queue
        self.secret = secret
        self.heartbeat_interval = heartbeat_interval
        stop_ids = sorted({i for chat in self.models.values() for i in chat.stop_token_ids})
        self.engine = BatchEngine(loaded.model, loaded.tokenizer, stop_ids, max_batch_size, prefill_chunk,
                                  routing=routing)
        self._waiting: list[GenerationJob] = []
        self._running = 0
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.refused: str | None = None  # why the controller refused us; set before `stopped` is
        self.stopped = threading.Event()  # the worker ended itself (registration refused): its process exits
        self._said_unhealthy = False
        self._scheduler: threading.Thread | None = None
        self._scheduler_error: str | None = None

    @property
    def healthy(self) -> bool:
        """False once the scheduler thread has died (the worker can no longer generate)."""
        if self._scheduler_error is not None:
            return False
        scheduler = self._scheduler  # not started yet (start() is between creating and starting it): healthy
        return scheduler is None or scheduler.ident is None or scheduler.is_alive() or self._stopping.is_set()

    # ---- intake ---------------------------------------------------------------------------------------
    def chat_model(self, body: dict) -> ChatModel:
        """The model a request names (`model`: the base or one of its adapters); the base when it names none.

        Raises:
            APIError: MODEL_NOT_FOUND for a name this worker does not serve.
        """
        name = body.get("model")
        if name is None:
            return self.loaded
        if name not in self.models:
            raise APIError(ErrorCode.MODEL_NOT_FOUND, f"this worker serves {', '.join(sorted(self.models))}, not "
                           f"{name!r}", "model")
        return self.models[name]

    def prompt_ids(self, body: dict) -> list[int]:
        """Token ids for a request: chat `messages` through the template, or a raw `prompt` string."""
        if "messages" in body:
            try:
                messages = validate_messages(body["messages"], require_final_user=True)
            except MessageError as err:
                raise APIError(ErrorCode.INVALID_MESSAGES, str(err), "messages") from None
            return self.chat_model(body).encoder.encode_prompt(messages)
        if "prompt_ids" in body:  # token ids, used as given (no BOS added), e.g. lm-evaluation-harness's
            ids = body["prompt_ids"]
            vocab = len(self.loaded.tokenizer)
            if not isinstance(ids, list) or not ids or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise APIError(ErrorCode.INVALID_VALUE, f"a token-id prompt must be a non-empty list of ids in "
                               f"[0, {vocab})", "prompt")
            return list(ids)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise APIError(ErrorCode.MISSING_PARAMETER, "give 'messages' or a non-empty 'prompt'", "prompt")
        return self.loaded.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def make_job(self, body: dict) -> GenerationJob:
        """Validate a worker request and build its job (does not queue it).

        Chat requests get the template's stop strings and reply lead; raw prompts are continued as they are.

        Raises:
            APIError: bad fields (naming the parameter), or prompt + max_tokens beyond the context length.
        """
        chat = self.chat_model(body)
        ids = self.prompt_ids(body)
        params = self._sampling_params(body.get("params") or {}, len(ids))
        adapter = chat.name if chat is not self.loaded else None
        if "messages" in body:
            return chat_job(chat, ids, params, adapter=adapter)
        return GenerationJob(ids, params, adapter=adapter)

    def _sampling_params(self, raw: dict, prompt_tokens: int) -> SamplingParams:
        """The job's settings from the body's "params" (checked again here although the API checked them: the
        worker is reachable by anyone holding the secret, and one bad job must not reach the engine)."""
        params = SamplingParams.from_dict(raw)
        context = self.loaded.context_length
        room = context - prompt_tokens
        if params.max_tokens is None:
            params.max_tokens = max(0, min(DEFAULT_MAX_TOKENS, room))
        scoring_only = params.echo and params.max_tokens == 0
        if prompt_tokens + params.max_tokens > context or (room < 1 and not scoring_only):
            raise APIError(ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                           f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{prompt_tokens + max(params.max_tokens, 1)} tokens ({prompt_tokens} in the messages, "
                           f"{max(params.max_tokens, 1)} in the completion). Please reduce the length of the "
                           "messages or completion.", "messages")
        return params

    def submit(self, job: GenerationJob) -> None:
        """Queue a job for the scheduler.

        Raises:
            APIError: QUEUE_FULL when `max_queue` requests are already waiting or running; WORKER_FAILED when the
                scheduler has died.
        """
        with self._lock:
            if not self.healthy:
                raise APIError(ErrorCode.WORKER_FAILED, "this worker cannot generate (its scheduler stopped)")
            if len(self._waiting) + self._running >= self.max_queue:
                raise APIError(ErrorCode.QUEUE_FULL, f"the worker's queue is full ({self.max_queue} requests); "
                               "retry shortly")
            self._waiting.append(job)
            self._lock.notify()

    def queue_length(self) -> int:
        with self._lock:
            return len(self._waiting) + self._running

    def stream(self, job: GenerationJob, poll: float = 1.0) -> Iterator[Event]:
        """Events of a submitted job (`serve.worker_events`); closing the iterator cancels the job."""
        try:
            while True:
                try:
                    event = job.events.get(timeout=poll)
                except queue.Empty:
                    if self._stopping.is_set():
                        yield ErrorEvent("the worker is shutting down")
                        return
                    if not self.healthy:
                        yield ErrorEvent("the worker's scheduler stopped")
                        return
                    continue
                yield event
                if is_final(event):
                    return
        finally:
            job.cancelled.set()

    # ---- threads --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler and (with a controller) the heartbeat thread; tries to register first.

        Raises:
            RegistrationRefused: the controller refused the secret; nothing was started.
        """
        if self.controller:
            try:
                self.register()
            except RegistrationRefused:
                raise
            except Exception as err:  # e.g. the controller starts later: heartbeats retry the registration
                log.warning("could not register with %s yet (%s); retrying every %.1f s", self.controller, err,
                            self.heartbeat_interval)
        self._scheduler = threading.Thread(target=self._schedule_loop, name="scheduler", daemon=True)
        self._threads = [self._scheduler]
        if self.controller:
            self._threads.append(threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def take_jobs(self, limit: int, timeout: float | None = None) -> list[GenerationJob]:
        """Up to `limit` waiting jobs (cancelled ones are dropped); waits up to `timeout` s when none wait."""
        with self._lock:
            if not self._waiting and timeout:
                self._lock.wait(timeout)
            self._waiting = [j for j in self._waiting if not j.cancelled.is_set()]
            jobs = self._waiting[:max(limit, 0)]
            del self._waiting[:len(jobs)]
            self._running += len(jobs)
            return jobs

    def _schedule_loop(self) -> None:
        """Admit waiting jobs into free batch slots between steps; idle-wait only when nothing runs.

        The engine never raises for a job; should anything else break this loop, every waiting and running job
        gets an error event and the worker reports itself unhealthy instead of hanging its clients.
        """
        engine = self.engine
        try:
            while not self._stopping.is_set():
                jobs = self.take_jobs(engine.free_slots, timeout=None if engine.active else 0.5)
                engine.add(jobs)
                engine.step()
                with self._lock:
                    self._running = engine.active
        except BaseException as err:
            log.exception("the scheduler thread died; this worker stops taking requests")
            self._scheduler_error = f"{type(err).__name__}: {err}"
            with self._lock:
                waiting, self._waiting = self._waiting, []
                self._running = 0
            message = "the worker's scheduler stopped"
            for job in waiting:
                job.events.put(ErrorEvent(message))
            engine.abort(message)

    # ---- the controller ---------------------------------------------------------------------------------
    def _headers(self) -> dict:
        return {SECRET_HEADER: self.secret} if self.secret else {}

    def _post(self, path: str, body: dict, timeout: float) -> dict:
        reply = self.http.post(f"{self.controller}{path}", headers=self._headers(), timeout=timeout, json=body)
        if reply.status_code in (401, 403):
            raise RegistrationRefused(f"the controller at {self.controller} refused this worker (HTTP "
                                      f"{reply.status_code}): wrong or missing --worker-secret")
        reply.raise_for_status()
        return reply.json()

    def register(self) -> None:
        """Register with the controller.

        Raises:
            RegistrationRefused: the controller refused the secret.
        """
        self._post("/register_worker", {"worker_address": self.address, "models": list(self.models),
                                        "queue_length": self.queue_length(), "max_queue": self.max_queue}, 10)
        log.info("registered %s with %s", self.address, self.controller)

    def heartbeat(self) -> None:
        """Report queue length and health; register again when the controller forgot us (e.g. it restarted).

        An unhealthy worker says so (the controller drops it at once) and does not register again.
        """
        healthy = self.healthy
        reply = self._post("/heartbeat", {"worker_address": self.address, "queue_length": self.queue_length(),
                                          "healthy": healthy}, 5)
        if not healthy and not self._said_unhealthy:
            self._said_unhealthy = True
            log.error("the scheduler stopped: this worker reported itself unhealthy and left the controller")
        elif healthy and not reply.get("exist", False):
            log.warning("the controller at %s does not know this worker (restarted?): registering again",
                        self.controller)
            self.register()

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat_interval):
            try:
                self.heartbeat()
            except RegistrationRefused as err:  # the controller now wants another secret: end the worker
                log.error("%s; stopping", err)
                self.refused = str(err)
                self.stopped.set()
                return
            except Exception as err:  # the controller may restart; keep trying
                log.warning("heartbeat to %s failed: %s", self.controller, err)


def create_app(worker: Worker, max_content_length: int = 4 * 1024 * 1024):
    """The worker's Flask app; /worker_generate_stream answers `serve.worker_events` event lines.

    Every endpoint but /health needs the worker secret (when the worker has one), so nobody reaches the model
    around the API's keys and moderation.
    """
    from flask import Flask, Response, jsonify, request, stream_with_context

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_content_length
    metrics = ServingMetrics()
    metrics.gauge("ds_vicuna_queue_length", "Requests waiting or running on this worker", worker.queue_length)
    metrics.gauge("ds_vicuna_queue_limit", "Requests this worker holds before answering 429",
                  lambda: worker.max_queue)
    install_error_handlers(app, metrics)
    require_secret(app, worker.secret)
    install_metrics(app, metrics)

    def observed(job: GenerationJob) -> Iterator[bytes]:
        started, first = time.monotonic(), True
        for event in worker.stream(job):
            if first and isinstance(event, TextEvent):
                first = False
                metrics.time_to_first_token.observe(time.monotonic() - started)
            elif isinstance(event, DoneEvent):
                metrics.job_finished(event.prompt_tokens, event.completion_tokens)
            elif isinstance(event, ErrorEvent):
                metrics.errors.labels(event.code).inc()
            yield to_line(event)

    @app.post("/worker_generate_stream")
    def generate_stream():
        if not worker.healthy:
            raise APIError(ErrorCode.WORKER_FAILED, "this worker's scheduler has stopped; it takes no requests")
        job = worker.make_job(json_body(request))
        worker.submit(job)
        return Response(stream_with_context(observed(job)), mimetype="application/x-ndjson")

    @app.post("/count_tokens")
    def count_tokens():
        return jsonify({"count": len(worker.prompt_ids(json_body(request)))})

    @app.get("/worker_status")
    def worker_status():
        return jsonify({"model": worker.loaded.name, "models": list(worker.models),
                        "queue_length": worker.queue_length(),
                        "max_queue": worker.max_queue, "max_batch_size": worker.engine.max_batch_size,
                        "context_length": worker.loaded.context_length, "healthy": worker.healthy})

    @app.get("/health")
    def health():
        if not worker.healthy:
            return jsonify({"status": "unhealthy", "reason": "the scheduler thread has stopped"}), 503
        return jsonify({"status": "ok"})

    return app
