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
streaming, and finished rows leave at once. A request's jobs (choices, prompts) arrive in one call
(`/worker_generate_batch`) and are admitted all or none: when they do not all fit in the queue now, the call is a
429 before anything is generated; a prompt plus max_tokens beyond the model's context answers 400. One job's
failure is that job's error event; if the scheduler thread dies anyway, `Worker.healthy` turns False, waiting
clients get an error event and new requests are refused.

The worker registers with the controller and heartbeats its queue length and health; a controller that refuses
the secret ends the worker (`RegistrationRefused`), one that forgot it (restarted) gets a new registration.

Endpoints (all but /health need the worker secret when one is set): POST /worker_generate_batch
(`{"jobs": [job, ...]}` -> JSON lines of `serve.worker_events`, each naming its job), POST /worker_generate_stream
(one job -> its lines), POST /count_tokens, GET /worker_status, /metrics (Prometheus), /health.
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
from ds_vicuna.serve.jobs import GenerationJob, JobSink, chat_job
from ds_vicuna.serve.metrics import ServingMetrics, install_metrics
from ds_vicuna.serve.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from ds_vicuna.serve.worker_events import ErrorEvent, Event, is_final, to_line

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
        max_queue: waiting + running jobs before new ones get 429 (also the most jobs one call may carry).
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
        self.metrics = ServingMetrics()

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
        """Queue a job for the scheduler (`submit_all` of one)."""
        self.submit_all([job])

    def submit_all(self, jobs: list[GenerationJob]) -> None:
        """Queue jobs for the scheduler, all or none.

        Raises:
            APIError: QUEUE_FULL (nothing queued) when they do not all fit beside the jobs waiting or running;
                INVALID_VALUE when there are more than `max_queue` (they never could); WORKER_FAILED when the
                scheduler has died.
        """
        if len(jobs) > self.max_queue:
            raise APIError(ErrorCode.INVALID_VALUE, f"{len(jobs)} jobs in one call, more than this worker's whole "
                           f"queue ({self.max_queue}, --max-queue)", "jobs")
        with self._lock:
            if not self.healthy:
                raise APIError(ErrorCode.WORKER_FAILED, "this worker cannot generate (its scheduler stopped)")
            held = len(self._waiting) + self._running
            if held + len(jobs) > self.max_queue:
                raise APIError(ErrorCode.QUEUE_FULL, f"the worker's queue is full ({held} of {self.max_queue} jobs "
                               f"held, {len(jobs)} asked for); retry shortly")
            self._waiting.extend(jobs)
            self._lock.notify()

    def queue_length(self) -> int:
        """Jobs waiting or running."""
        with self._lock:
            return len(self._waiting) + self._running

    def queue_depth(self) -> int:
        """Jobs waiting for a batch slot."""
        with self._lock:
            return len(self._waiting)

    def running_jobs(self) -> int:
        """Jobs in the batch (being prefilled or decoding)."""
        with self._lock:
            return self._running

    def open_jobs(self, jobs: list[GenerationJob], poll: float = 1.0) -> Iterator[tuple[int, Event]]:
        """Submit `jobs` now (all or none, see `submit_all`) and return their (index, event) pairs as they come.

        Each job's events are counted in `metrics` as the engine makes them, read or not. Closing the iterator
        (the caller went away) cancels the jobs that have not ended.
        """
        inbox: "queue.Queue[tuple[int, Event]]" = queue.Queue()
        started = time.monotonic()
        for i, job in enumerate(jobs):
            job.events = JobSink(inbox, i, self.metrics.observer(started=started, timed=True))
        self.submit_all(jobs)
        return self._events_of(jobs, inbox, poll)

    def _events_of(self, jobs: list[GenerationJob], inbox: "queue.Queue[tuple[int, Event]]",
                   poll: float) -> Iterator[tuple[int, Event]]:
        open_jobs = set(range(len(jobs)))
        try:
            while open_jobs:
                try:
                    index, event = inbox.get(timeout=poll)
                except queue.Empty:
                    reason = "the worker is shutting down" if self._stopping.is_set() else \
                        None if self.healthy else "the worker's scheduler stopped"
                    if reason is not None:
                        for index in sorted(open_jobs):
                            yield index, ErrorEvent(reason)
                        return
                    continue
                if is_final(event):
                    open_jobs.discard(index)
                yield index, event
        finally:
            for job in jobs:
                job.cancelled.set()

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
    metrics = worker.metrics
    metrics.gauge("ds_vicuna_queue_length", "Jobs waiting or running on this worker", worker.queue_length)
    metrics.gauge("ds_vicuna_queue_depth", "Jobs waiting for a batch slot", worker.queue_depth)
    metrics.gauge("ds_vicuna_running_jobs", "Jobs in the batch (prefilling or decoding)", worker.running_jobs)
    metrics.gauge("ds_vicuna_queue_limit", "Jobs this worker holds before answering 429", lambda: worker.max_queue)
    install_error_handlers(app, metrics)
    require_secret(app, worker.secret)
    install_metrics(app, metrics)

    def lines(events: Iterator[tuple[int, Event]], tagged: bool) -> Iterator[bytes]:
        try:
            for index, event in events:
                yield to_line(event, index if tagged else None)
        finally:
            events.close()  # the API went away: cancel the jobs

    def jobs_of(body: dict) -> list[GenerationJob]:
        raw = body.get("jobs")
        if not isinstance(raw, list) or not raw or not all(isinstance(job, dict) for job in raw):
            raise APIError(ErrorCode.INVALID_VALUE, "'jobs' must be a non-empty list of job objects", "jobs")
        jobs = []
        for i, job in enumerate(raw):
            try:
                jobs.append(worker.make_job(job))
            except APIError as err:  # the API checked these already: name the job for whoever else calls
                raise APIError(err.code, f"jobs[{i}]: {err.message}" if len(raw) > 1 else err.message,
                               err.param) from None
        return jobs

    def generate(jobs: list[GenerationJob], tagged: bool):
        if not worker.healthy:
            raise APIError(ErrorCode.WORKER_FAILED, "this worker's scheduler has stopped; it takes no requests")
        events = worker.open_jobs(jobs)  # admitted all or none before the response starts: a 429 is a 429
        return Response(stream_with_context(lines(events, tagged)), mimetype="application/x-ndjson")

    @app.post("/worker_generate_batch")
    def generate_batch():
        return generate(jobs_of(json_body(request)), tagged=True)

    @app.post("/worker_generate_stream")
    def generate_stream():
        return generate([worker.make_job(json_body(request))], tagged=False)

    @app.post("/count_tokens")
    def count_tokens():
        return jsonify({"count": len(worker.prompt_ids(json_body(request)))})

    @app.get("/worker_status")
    def worker_status():
        return jsonify({"model": worker.loaded.name, "models": list(worker.models),
                        "queue_length": worker.queue_length(), "queue_depth": worker.queue_depth(),
                        "running_jobs": worker.running_jobs(),
                        "max_queue": worker.max_queue, "max_batch_size": worker.engine.max_batch_size,
                        "context_length": worker.loaded.context_length, "healthy": worker.healthy})

    @app.get("/health")
    def health():
        if not worker.healthy:
            return jsonify({"status": "unhealthy", "reason": "the scheduler thread has stopped"}), 503
        return jsonify({"status": "ok"})

    return app
