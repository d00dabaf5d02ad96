"""OpenAI-compatible API server and the web chat page.

    ds-vicuna serve api --controller http://127.0.0.1:21001 --port 8000 [--api-key K ...]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="K")

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as server-sent events
ending `data: [DONE]`), GET /health (200 only while a worker is registered), GET / (the chat page).

Each choice is one job on a worker picked by the controller. A worker that fails before its first token (refused
connection, 429, 5xx, broken stream) is excluded and the job goes to another one; a non-streaming request is
retried even after tokens, since the client has seen nothing yet.
"""
from __future__ import annotations

import hmac
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ds_vicuna.serve import schemas
from ds_vicuna.serve.moderation import Moderator
from ds_vicuna.serve.protocol import DoneEvent, ErrorEvent, Event, ProtocolError, TextEvent, is_final, parse_line
from ds_vicuna.serve.schemas import APIError, ErrorCode, GenerationOptions, Usage

STATIC_DIR = Path(__file__).parent / "static"
RETRYABLE = {ErrorCode.QUEUE_FULL, ErrorCode.WORKER_FAILED, ErrorCode.INTERNAL, ErrorCode.NO_WORKER}


@dataclass
class APIConfig:
    """Settings of the API server.

    Attributes:
        controller: the controller's URL.
        api_keys: accepted Bearer keys; empty means no authentication (only on a trusted host).
        max_content_length: request body limit in bytes (413 above it).
        max_attempts: workers tried per choice before giving up.
        moderator: the input filter (inactive by default).
    """

    controller: str
    api_keys: tuple[str, ...] = ()
    max_content_length: int = 1024 * 1024
    max_attempts: int = 3
    moderator: Moderator = field(default_factory=Moderator)


class Upstream:
    """Talks to the controller and workers; opens one job's event stream with failover.

    Args:
        controller: the controller's URL.
        http: an object with `get`/`post` like the `requests` module (stateless, safe across threads).
        max_attempts: workers tried per job.
    """

    def __init__(self, controller: str, http, max_attempts: int = 3):
        self.controller = controller.rstrip("/")
        self.http = http
        self.max_attempts = max_attempts

    def models(self) -> list[str]:
        reply = self._call("get", "/list_models")
        return list(reply.get("models", []))

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            reply = getattr(self.http, method)(f"{self.controller}{path}", timeout=10, **kwargs)
        except Exception as err:
            raise APIError(ErrorCode.NO_WORKER, f"the controller is unreachable: {type(err).__name__}") from None
        body = _json_or_none(reply)
        if reply.status_code != 200:
            raise APIError.from_body(body, reply.status_code)
        return body or {}

    def pick(self, model: str, exclude: list[str]) -> str:
        return self._call("post", "/get_worker_address", json={"model": model, "exclude": exclude})["address"]

    def open(self, model: str, payload: dict) -> Iterator[Event]:
        """Events of one job (`serve.protocol`), its first event already received.

        Raises:
            APIError: a client error from the worker (e.g. context length), or every attempt failed.
        """
        return self.open_at(model, payload, [])[1]

    def open_at(self, model: str, payload: dict, tried: list[str]) -> tuple[str, Iterator[Event]]:
        """Like `open`, also returning the worker's address; failed workers are appended to `tried`."""
        last: APIError | None = None
        for _ in range(self.max_attempts):
            try:
                address = self.pick(model, tried)
            except APIError as err:
                raise (last if last is not None and err.code is ErrorCode.NO_WORKER else err) from None
            try:
                events = self._start(address, payload)
                first = next(events)
            except APIError as err:
                if err.code not in RETRYABLE:
                    raise
                tried.append(address)
                last = err
                continue
            if isinstance(first, ErrorEvent):
                tried.append(address)
                last = APIError(ErrorCode.WORKER_FAILED, f"worker failed: {first.message}")
                continue
            return address, JobStream(first, events)
        raise last or APIError(ErrorCode.NO_WORKER, f"no worker could serve model '{model}'")

    def _start(self, address: str, payload: dict) -> Iterator[Event]:
        try:
            reply = self.http.post(f"{address}/worker_generate_stream", json=payload, stream=True, timeout=(5, 600))
        except Exception as err:
            raise APIError(ErrorCode.WORKER_FAILED, f"worker {address} unreachable: {type(err).__name__}") from None
        if reply.status_code != 200:
            body = _json_or_none(reply)
            reply.close()
            raise APIError.from_body(body, reply.status_code)
        return self._lines(reply, address)

    @staticmethod
    def _lines(reply, address: str) -> Iterator[Event]:
        try:
            for line in reply.iter_lines():
                if line:
                    event = parse_line(line)
                    yield event
                    if is_final(event):
                        return
            raise APIError(ErrorCode.WORKER_FAILED, f"worker {address} closed the stream early")
        except APIError:
            raise
        except ProtocolError as err:
            raise APIError(ErrorCode.WORKER_FAILED, f"worker {address} sent a bad event: {err}") from None
        except Exception as err:
            raise APIError(ErrorCode.WORKER_FAILED, f"worker {address} failed mid-stream: "
                           f"{type(err).__name__}") from None
        finally:
            reply.close()

    def complete(self, model: str, payload: dict) -> dict:
        """Run one job to the end: {"text", "finish_reason", "prompt_tokens", "completion_tokens"}; retried whole."""
        tried: list[str] = []
        last: APIError | None = None
        for _ in range(self.max_attempts):
            parts, address = [], None
            try:
                address, events = self.open_at(model, payload, tried)
                for event in events:
                    if isinstance(event, TextEvent):
                        parts.append(event.text)
                    elif isinstance(event, DoneEvent):
                        return {"text": "".join(parts), "finish_reason": event.finish_reason,
                                "prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
                    else:
                        raise APIError(ErrorCode.WORKER_FAILED, f"worker failed: {event.message}")
            except APIError as err:
                if err.code not in RETRYABLE:
                    raise
                if address is not None:
                    tried.append(address)
                last = err
        raise last or APIError(ErrorCode.NO_WORKER, f"no worker could serve model '{model}'")


class JobStream:
    """A job's events: `first` (already received), then `events`. `close()` closes `events`, and so the worker
    connection, whether or not iteration began (closing a generator that never started runs no `finally`)."""

    def __init__(self, first: Event, events: Iterator[Event]):
        self._first: list[Event] = [first]
        self._events = events

    def __iter__(self) -> "JobStream":
        return self

    def __next__(self) -> Event:
        return self._first.pop() if self._first else next(self._events)

    def close(self) -> None:
        _close(self._events)


def _close(stream) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _json_or_none(reply):
    try:
        return reply.json()
    except Exception:
        return None


def merge_choices(streams: list[Iterator[Event]]) -> Iterator[tuple[int, Event]]:
    """(choice index, event) from several job streams as they arrive; ends after each stream's last event."""
    if len(streams) == 1:
        yield from ((0, event) for event in _guarded(streams[0]))
        return
    merged: "queue.Queue[tuple[int, Event]]" = queue.Queue()
    stop = threading.Event()  # the client went away: every pump closes its stream at its next event

    def pump(index: int, stream: Iterator[Event]):
        guarded = _guarded(stream)
        try:
            for event in guarded:
                if stop.is_set():
                    return
                merged.put((index, event))
        finally:
            guarded.close()

    for index, stream in enumerate(streams):
        threading.Thread(target=pump, args=(index, stream), daemon=True).start()
    open_streams = len(streams)
    try:
        while open_streams:
            index, event = merged.get()
            if is_final(event):
                open_streams -= 1
            yield index, event
    finally:
        stop.set()


def _guarded(stream: Iterator[Event]) -> Iterator[Event]:
    """A job stream whose failure becomes a final `ErrorEvent`; closing it closes the stream."""
    try:
        for event in stream:
            yield event
            if is_final(event):
                return
    except APIError as err:
        yield ErrorEvent(err.message, err.code.value)
    finally:
        _close(stream)


class ChatService:
    """The request logic behind the HTTP handlers (parse -> moderate -> route -> respond)."""

    def __init__(self, config: APIConfig, upstream: Upstream):
        self.config = config
        self.upstream = upstream

    def chat(self, body: dict):
        """A chat.completion dict, or an iterator of SSE bytes when streaming."""
        options, messages = schemas.parse_chat_request(body)
        self.config.moderator.check([m.content for m in messages])
        payload = {"messages": [m.as_dict() for m in messages]}
        return self._run(options, payload, chat=True)

    def completion(self, body: dict):
        options, prompt = schemas.parse_completion_request(body)
        self.config.moderator.check([prompt])
        return self._run(options, {"prompt": prompt}, chat=False)

    def _run(self, options: GenerationOptions, payload: dict, chat: bool):
        jobs = [{**payload, "params": options.worker_params(i)} for i in range(options.n)]
        if not options.stream:
            return self._collect(options, jobs, chat)
        streams: list[Iterator[Event]] = []
        try:
            for job in jobs:
                streams.append(self.upstream.open(options.model, job))  # errors surface as HTTP status
        except APIError:
            for stream in streams:  # choices already started must not keep a worker busy
                _close(stream)
            raise
        return self._sse(options, streams, chat)

    def _collect(self, options: GenerationOptions, jobs: list[dict], chat: bool) -> dict:
        results: list[dict | APIError] = [None] * len(jobs)

        def run(index: int):
            try:
                results[index] = self.upstream.complete(options.model, jobs[index])
            except APIError as err:
                results[index] = err

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for result in results:
            if isinstance(result, APIError):
                raise result
        usage = Usage(results[0]["prompt_tokens"], sum(r["completion_tokens"] for r in results))
        choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"]} for i, r in enumerate(results)]
        build = schemas.chat_response if chat else schemas.completion_response
        return build(schemas.new_id("chatcmpl" if chat else "cmpl"), options.model, choices, usage)

    def _sse(self, options: GenerationOptions, streams: list[Iterator[Event]], chat: bool) -> Iterator[bytes]:
        rid, created, model = schemas.new_id("chatcmpl" if chat else "cmpl"), int(time.time()), options.model
        usage = Usage()

        def chunk(index: int, text: str | None, finish: str | None) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                return schemas.sse(schemas.chat_chunk(rid, model, created, index, delta, finish))
            return schemas.sse(schemas.completion_chunk(rid, model, created, index, text or "", finish))

        if chat:
            for index in range(len(streams)):
                yield chunk(index, None, None)
        merged = merge_choices(streams)
        try:  # a client that disconnects closes this generator: close every worker stream with it
            for index, event in merged:
                if isinstance(event, TextEvent):
                    yield chunk(index, event.text, None)
                elif isinstance(event, DoneEvent):
                    usage.prompt_tokens = event.prompt_tokens
                    usage.completion_tokens += event.completion_tokens
                    yield chunk(index, "", event.finish_reason)
                else:
                    err = APIError(ErrorCode.WORKER_FAILED,
                                   f"generation failed after streaming began: {event.message}")
                    yield schemas.sse(err.body())
        finally:
            merged.close()
        if options.include_usage:
            yield schemas.sse(schemas.usage_chunk(rid, "chat.completion.chunk" if chat else "text_completion",
                                                  model, created, usage))
        yield schemas.sse("[DONE]")


def create_app(config: APIConfig, http=None):
    """The API server's Flask app.

    Args:
        config: the server settings.
        http: the HTTP client for controller and workers (default: the `requests` module).
    """
    from flask import Flask, Response, jsonify, request, send_from_directory, stream_with_context

    from ds_vicuna.serve.http_util import install_error_handlers, json_body

    if http is None:
        import requests as http
    service = ChatService(config, Upstream(config.controller, http, config.max_attempts))
    keys = [k.encode() for k in config.api_keys]
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_content_length
    install_error_handlers(app)

    @app.before_request
    def authenticate():
        if not keys or not request.path.startswith("/v1/"):
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

    @app.post("/v1/chat/completions")
    def chat_completions():
        return respond(service.chat(json_body(request)))

    @app.post("/v1/completions")
    def completions():
        return respond(service.completion(json_body(request)))

    @app.get("/v1/models")
    def models():
        return jsonify(schemas.model_list(service.upstream.models()))

    @app.get("/health")
    def health():
        try:
            names = service.upstream.models()
        except APIError as err:
            return jsonify({"status": "unavailable", "reason": err.message}), 503
        if not names:
            return jsonify({"status": "unavailable", "reason": "no worker registered"}), 503
        return jsonify({"status": "ok", "models": names})

    @app.get("/")
    def index():
        return send_from_directory(STATIC_DIR, "index.html")

    return app


def iter_sse(lines: Iterable[bytes]) -> Iterator[dict]:
    """Parse `data: ...` lines of an SSE stream into dicts (stops at [DONE]); for clients and tests."""
    for line in lines:
        if not line or not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):]
        if data.strip() == b"[DONE]":
            return
        yield json.loads(data)
