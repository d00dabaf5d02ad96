"""`ds-vicuna serve ...` and `ds-vicuna chat`: start the serving stack, or talk to it from a terminal.

    ds-vicuna serve all --model embedded --port 8000                  # controller + worker + API, one process
    ds-vicuna serve all --model BASE --adapter support=out/support-lora --adapter sql=out/sql-lora   # LoRA adapters
    ds-vicuna serve controller --host 0.0.0.0 --port 21001 --worker-secret S
    ds-vicuna serve worker --model out/export --controller http://10.0.0.1:21001 --host 0.0.0.0 \
        --worker-address http://10.0.0.2:21002 --port 21002 --worker-secret S
    ds-vicuna serve api --controller http://10.0.0.1:21001 --port 8000 --api-key K --worker-secret S
    ds-vicuna chat --base-url http://127.0.0.1:8000/v1

Every server binds 127.0.0.1 unless --host says otherwise and runs under waitress. The worker secret guards every
internal endpoint (controller and workers; the API sends it); a controller or worker bound to another interface
refuses to start without one unless `--insecure` is given. The worker secret and API keys can come from
$DS_VICUNA_WORKER_SECRET and $DS_VICUNA_API_KEYS (comma separated) to keep them out of `ps`.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading

from ds_vicuna.model.loading import DEVICE_MAPS, DTYPE_CHOICES  # plain tuples: importing the loader loads no torch
from ds_vicuna.serve.admission import DEFAULT_MAX_JOBS_PER_REQUEST, DEFAULT_MAX_RUNNING_REQUESTS

DEFAULT_CONTROLLER = "http://127.0.0.1:21001"
# Server sizes, on purpose (see `_server_sizes`): a streaming response holds a thread to its end, so the API keeps
# SPARE_THREADS beyond --max-running-requests for /health, /v1/models and the 429s themselves, and every role
# accepts far more connections than it has threads (they queue instead of being refused at the TCP level).
SPARE_THREADS = 16
CONTROLLER_THREADS = 16
CONNECTION_LIMIT = 1000
READY_TIMEOUT_S = 120.0


def register(subparsers) -> None:
    """Add `serve` and `chat` to the `ds-vicuna` parser."""
    serve = subparsers.add_parser("serve", help="serve a model: controller, workers, OpenAI-compatible API")
    roles = serve.add_subparsers(dest="role", required=True)

    p = roles.add_parser("all", help="controller + one worker + API server in one process")
    _net_args(p, 8000)
    _worker_args(p)
    _api_args(p)
    _secret_arg(p)
    p.add_argument("--controller-host", default="127.0.0.1",
                   help="interface the controller binds (another than 127.0.0.1 lets workers on other hosts join)")
    p.add_argument("--controller-port", type=int, default=0, help="controller port (default: a free one)")
    p.add_argument("--heartbeat-expiry", type=float, default=10.0, help="seconds before a silent worker is dropped")
    p.set_defaults(func=run_all)

    p = roles.add_parser("controller", help="the worker registry and router")
    _net_args(p, 21001)
    _secret_arg(p, exposed=True)
    p.add_argument("--heartbeat-expiry", type=float, default=10.0, help="seconds before a silent worker is dropped")
    p.set_defaults(func=run_controller)

    p = roles.add_parser("worker", help="one model worker")
    _net_args(p, 21002)
    _worker_args(p)
    _secret_arg(p, exposed=True)
    p.add_argument("--controller", default=DEFAULT_CONTROLLER, help="controller URL")
    p.add_argument("--worker-address", help="URL the controller calls (default: http://HOST:PORT)")
    p.set_defaults(func=run_worker)

    p = roles.add_parser("api", help="the OpenAI-compatible API server and web chat page")
    _net_args(p, 8000)
    _api_args(p)
    _secret_arg(p)
    p.add_argument("--controller", default=DEFAULT_CONTROLLER, help="controller URL")
    p.set_defaults(func=run_api)

    chat = subparsers.add_parser("chat", help="chat with a served model in the terminal")
    chat.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    chat.add_argument("--model", help="model name (default: the first one served)")
    chat.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--system", help="a system message")
    chat.set_defaults(func=run_chat)


def _net_args(p, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--threads", type=int, default=0, help="waitress threads (default: sized for the role: the API "
                   "--max-running-requests + 16, a worker --max-queue + 8, the controller 16)")
    p.add_argument("--log-level", default="WARNING")


def _worker_args(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder, or 'embedded' (SmolLM2-135M-Instruct)")
    p.add_argument("--model-name", help="name clients use (default: the folder name)")
    p.add_argument("--template", help="chat template (default: from the checkpoint's ds_vicuna.json)")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default auto: the GPU when there "
                   "is one). A multi-GPU node runs one worker per GPU: --device cuda:0, --device cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights precision (default auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU)")
    p.add_argument("--device-map", choices=DEVICE_MAPS,
                   help="spread one model over every visible GPU (for a model too big for one GPU)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens prefilled between two decode steps, so long prompts do not stall running "
                   "streams (default: 256 on CPU, 2048 on GPU; 0 = whole prompts at once)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve a LoRA adapter folder (peft's, e.g. `ds-vicuna export` of a LoRA run) over the base "
                   "as model NAME; repeat for several: one copy of the base, adapters mixed in each batch")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="jobs (a request brings prompts x n) waiting or "
                   "running before a 429; also the most one request may bring")
    p.add_argument("--heartbeat-interval", type=float, default=2.0)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="CPU threads for torch (default: torch's choice; use 1 per worker when several share cores)")


def _api_args(p) -> None:
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted Bearer key (repeat for several; default: $DS_VICUNA_API_KEYS or none)")
    p.add_argument("--max-content-length", type=int, default=1024 * 1024, help="request body limit in bytes")
    p.add_argument("--max-jobs-per-request", type=_positive, default=DEFAULT_MAX_JOBS_PER_REQUEST,
                   help="most completions (prompts x n) one request may ask for; more is a 400 naming this limit "
                   f"(default {DEFAULT_MAX_JOBS_PER_REQUEST})")
    p.add_argument("--max-running-requests", type=_positive, default=DEFAULT_MAX_RUNNING_REQUESTS,
                   help="generation requests the API runs at once; one more is a 429 with Retry-After at once "
                   f"(default {DEFAULT_MAX_RUNNING_REQUESTS}; the server keeps 16 more threads for health checks "
                   "and refusals)")
    p.add_argument("--blocked-words", help="moderation: file of blocked words/phrases, one a line")
    p.add_argument("--moderation-url", help="moderation: an OpenAI-compatible /v1/moderations URL")
    p.add_argument("--moderation-key", default=os.environ.get("DS_VICUNA_MODERATION_KEY"))


def _secret_arg(p, exposed: bool = False) -> None:
    p.add_argument("--worker-secret", default=os.environ.get("DS_VICUNA_WORKER_SECRET"),
                   help="shared secret of controller, workers and API (default: $DS_VICUNA_WORKER_SECRET)")
    if exposed:
        p.add_argument("--insecure", action="store_true",
                       help="allow binding a non-loopback interface without a worker secret (not recommended)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _check_exposure(args, role: str, host: str) -> None:
    """A controller or worker reachable from other hosts needs the worker secret, or an explicit --insecure.

    Raises:
        SystemExit: bound beyond loopback without a secret or --insecure.
    """
    from ds_vicuna.serve.http_util import is_loopback

    if args.worker_secret or is_loopback(host):
        return
    if not args.insecure:
        raise SystemExit(f"error: refusing to start the {role} on {host} without a worker secret: anyone who "
                         "reaches it could use the model without an API key (and register workers). Set "
                         "--worker-secret or $DS_VICUNA_WORKER_SECRET, bind 127.0.0.1, or pass --insecure.")
    print(f"WARNING: the {role} listens on {host} with NO worker secret (--insecure): anyone who reaches this "
          "port can generate, read its status and register workers.", file=sys.stderr, flush=True)


# ---- building blocks ----------------------------------------------------------------------------------
def _api_keys(args) -> tuple[str, ...]:
    keys = args.api_key or [k for k in os.environ.get("DS_VICUNA_API_KEYS", "").split(",") if k]
    return tuple(keys)


def _build_api(args, controller_url: str, secret: str | None):
    import requests

    from ds_vicuna.serve.api_router import APIConfig, create_app
    from ds_vicuna.serve.http_util import is_loopback
    from ds_vicuna.serve.moderation import Moderator

    moderator = Moderator.from_file(args.blocked_words, endpoint=args.moderation_url, api_key=args.moderation_key,
                                    http=requests)
    keys = _api_keys(args)
    if not keys and not is_loopback(args.host):
        print(f"warning: the API listens on {args.host} without --api-key: anyone who reaches it can use the model",
              file=sys.stderr, flush=True)
    config = APIConfig(controller_url, keys, args.max_content_length, moderator=moderator, worker_secret=secret,
                       max_jobs_per_request=args.max_jobs_per_request,
                       max_running_requests=args.max_running_requests)
    return create_app(config)  # its own pooled keep-alive session to the controller and workers


def _build_worker(args, controller_url: str | None, server_url: str, secret: str | None):
    from ds_vicuna.model.adapters import parse_adapter_arg
    from ds_vicuna.model.loading import load_chat_model
    from ds_vicuna.serve.multi_lora import load_adapter_models
    from ds_vicuna.serve.routing import pooled_session
    from ds_vicuna.serve.worker import Worker
    from ds_vicuna.chat.templates import TemplateError

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    try:
        loaded = load_chat_model(args.model, args.template, args.model_name, device=args.device, dtype=args.dtype,
                                 device_map=args.device_map)
        adapters, routing = load_adapter_models(loaded, [parse_adapter_arg(a) for a in args.adapter])
    except (FileNotFoundError, ValueError, TemplateError) as err:  # AdapterError is a ValueError
        raise SystemExit(f"ds-vicuna serve: error: {err}") from None
    placement = getattr(loaded.model, "hf_device_map", None) and "several devices (--device-map)" or loaded.device
    print(f"loaded {loaded.name} on {placement} as {str(loaded.dtype).removeprefix('torch.')}, template "
          f"{loaded.template}, context {loaded.context_length} tokens", flush=True)
    for chat in adapters:
        print(f"adapter {chat.name} (template {chat.template}) over {loaded.name}", flush=True)
    return Worker(loaded, server_url, controller_url, pooled_session(2), args.max_batch_size, args.max_queue, secret,
                  args.heartbeat_interval, prefill_chunk=args.prefill_chunk, adapters=adapters, routing=routing)


class Servers:
    """Waitress servers run in threads until Ctrl-C or SIGTERM, then all close."""

    def __init__(self):
        self.servers, self.stop_event = [], threading.Event()

    def add(self, app, host: str, port: int, threads: int):
        from ds_vicuna.serve.http_util import make_server

        server = make_server(app, host, port, threads, max(CONNECTION_LIMIT, 4 * threads))
        self.servers.append(server)
        return server

    def start(self) -> None:
        for server in self.servers:
            threading.Thread(target=server.run, daemon=True).start()

    def wait(self, until: threading.Event | None = None) -> None:
        """Serve until Ctrl-C, SIGTERM or `until` is set; then close every server."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        try:
            while not self.stop_event.wait(0.5) and not (until is not None and until.is_set()):
                pass
        except KeyboardInterrupt:
            pass
        self.close()

    def close(self) -> None:
        for server in self.servers:
            server.close()


def _threads(args, default: int) -> int:
    return args.threads or default


def _api_threads(args) -> int:
    return args.threads or args.max_running_requests + SPARE_THREADS


def _raise_fd_limit() -> None:
    """Let this process open as many sockets as the system allows it (the soft limit up to the hard one)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def _wait_until_served(api_url: str, model: str, worker, timeout: float = READY_TIMEOUT_S) -> bool:
    """Poll the API's own /health until it lists `model` (a worker serves it, end to end); False on timeout or
    when the worker ended itself."""
    import time

    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not worker.stopped.is_set():
        try:
            reply = requests.get(f"{api_url}/health", timeout=5)
            if reply.status_code == 200 and model in reply.json().get("models", []):
                return True
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.1)
    return False


def _setup_logging(args) -> None:
    _raise_fd_limit()
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


# ---- commands -----------------------------------------------------------------------------------------
def _start_worker(worker, servers: Servers) -> bool:
    """Start the worker; when the controller refuses it, say so and close the servers (False)."""
    from ds_vicuna.serve.worker import RegistrationRefused

    try:
        worker.start()
    except RegistrationRefused as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        servers.close()
        return False
    return True


def _loopback(host: str) -> str:
    """The address this process calls its own server bound to `host` by (a wildcard is called on 127.0.0.1)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _reachable_name(host: str) -> str:
    """What other hosts call this one: `host` itself unless it is a wildcard address."""
    import socket

    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def _join_instructions(args, controller_url: str, secret_given: bool) -> str:
    """How a worker on another host joins this `serve all`."""
    from ds_vicuna.serve.http_util import is_loopback

    if is_loopback(args.controller_host):
        return ("workers on other hosts can join after a restart with --controller-host 0.0.0.0 and "
                "--worker-secret S (or $DS_VICUNA_WORKER_SECRET)")
    command = (f"DS_VICUNA_WORKER_SECRET=<the secret> ds-vicuna serve worker --model PATH --controller "
               f"{controller_url} --host 0.0.0.0 --port 21002 --worker-address http://<that host>:21002")
    if not secret_given:
        return (f"workers on other hosts join with: {command}\n  (this run's worker secret was generated and is "
                "not shown: restart with --worker-secret or $DS_VICUNA_WORKER_SECRET to share one)")
    return f"workers on other hosts join with the same worker secret: {command}"


def run_all(args) -> int:
    from ds_vicuna.serve.controller import Controller
    from ds_vicuna.serve.controller import create_app as controller_app
    from ds_vicuna.serve.http_util import server_url
    from ds_vicuna.serve.worker import create_app as worker_app

    _setup_logging(args)
    secret_given = bool(args.worker_secret)
    secret = args.worker_secret or secrets.token_hex(16)
    servers = Servers()
    controller = servers.add(controller_app(Controller(args.heartbeat_expiry, secret)), args.controller_host,
                             args.controller_port, CONTROLLER_THREADS)
    controller_url = server_url(controller, _loopback(args.controller_host))
    api = servers.add(_build_api(args, controller_url, secret), args.host, args.port, _api_threads(args))
    box = {}  # the worker app needs the worker, the worker needs its own URL: bind first, build after
    worker_server = servers.add(lambda environ, start: box["app"](environ, start), "127.0.0.1", 0,
                                args.max_queue + 8)
    servers.start()
    worker = _build_worker(args, controller_url, server_url(worker_server, "127.0.0.1"), secret)
    box["app"] = worker_app(worker)
    if not _start_worker(worker, servers):
        return 1
    if not _wait_until_served(server_url(api, _loopback(args.host)), worker.loaded.name, worker):
        print(f"error: the API did not list {worker.loaded.name!r} within {READY_TIMEOUT_S:.0f} s of the worker's "
              "start (see the log above)", file=sys.stderr, flush=True)
        servers.close()
        worker.stop()
        return 1
    public_controller = f"http://{_reachable_name(args.controller_host)}:{controller.effective_port}"
    names = ", ".join(map(repr, worker.models))
    print(f"controller at {controller_url}; worker {worker.address} serving {names}", flush=True)
    print(_join_instructions(args, public_controller, secret_given), flush=True)
    print(f"ds-vicuna API ready at http://{args.host}:{api.effective_port}/v1 "
          f"(chat page: http://{args.host}:{api.effective_port}/)", flush=True)
    servers.wait(until=worker.stopped)
    worker.stop()
    return 1 if worker.refused else 0


def run_controller(args) -> int:
    from ds_vicuna.serve.controller import Controller, create_app
    from ds_vicuna.serve.http_util import server_url

    _setup_logging(args)
    _check_exposure(args, "controller", args.host)
    if not args.worker_secret:
        print("warning: no --worker-secret; any process that reaches this port can register a worker",
              file=sys.stderr)
    servers = Servers()
    server = servers.add(create_app(Controller(args.heartbeat_expiry, args.worker_secret)), args.host, args.port,
                         _threads(args, CONTROLLER_THREADS))
    servers.start()
    print(f"ds-vicuna controller ready at {server_url(server, args.host)}", flush=True)
    servers.wait()
    return 0


def run_worker(args) -> int:
    from ds_vicuna.serve.http_util import server_url
    from ds_vicuna.serve.worker import create_app

    _setup_logging(args)
    _check_exposure(args, "worker", args.host)
    box = {}  # the worker app needs the worker, the worker needs its own URL: bind first, build after
    servers = Servers()
    server = servers.add(lambda environ, start: box["app"](environ, start), args.host, args.port,
                         _threads(args, args.max_queue + 8))
    address = args.worker_address or server_url(server, args.host)
    worker = _build_worker(args, args.controller, address, args.worker_secret)
    box["app"] = create_app(worker)
    servers.start()
    if not _start_worker(worker, servers):
        return 1
    names = ", ".join(map(repr, worker.models))
    print(f"ds-vicuna worker ready at {address} serving {names} (pid {os.getpid()})", flush=True)
    servers.wait(until=worker.stopped)
    worker.stop()
    if worker.refused:
        print(f"error: {worker.refused}", file=sys.stderr, flush=True)
        return 1
    return 0


def run_api(args) -> int:
    from ds_vicuna.serve.http_util import server_url

    _setup_logging(args)
    servers = Servers()
    server = servers.add(_build_api(args, args.controller, args.worker_secret), args.host, args.port,
                         _api_threads(args))
    servers.start()
    print(f"ds-vicuna API ready at {server_url(server, args.host)}/v1", flush=True)
    servers.wait()
    return 0


def run_chat(args) -> int:
    """A terminal chat loop: streams each answer; /reset clears the history, /exit (or Ctrl-D) quits."""
    import requests

    from ds_vicuna.serve.openai_protocol import iter_sse

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or _first_model(requests, base, headers)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatting with {model} at {base} (/reset, /exit)")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        body = {"model": model, "messages": history, "stream": True, "temperature": args.temperature,
                "max_tokens": args.max_tokens}
        reply = requests.post(f"{base}/chat/completions", json=body, headers=headers, stream=True, timeout=600)
        if reply.status_code != 200:
            print(f"error: {reply.json().get('error', {}).get('message', reply.text)}")
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        answer = []
        for event in iter_sse(reply.iter_lines()):
            if "error" in event:
                print(f"\nerror: {event['error'].get('message')}")
                break
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                answer.append(piece)
                print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(answer)})


def _first_model(http, base: str, headers: dict) -> str:
    reply = http.get(f"{base}/models", headers=headers, timeout=10)
    reply.raise_for_status()
    data = reply.json()["data"]
    if not data:
        raise SystemExit("the server has no model yet")
    return data[0]["id"]


def main(argv: list[str] | None = None) -> int:
    """`python -m ds_vicuna.serve ROLE ...` = `ds-vicuna serve ROLE ...`; `... chat` = `ds-vicuna chat`."""
    argv = list(argv if argv is not None else sys.argv[1:])
    parser = argparse.ArgumentParser(prog="ds-vicuna")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv if argv[:1] == ["chat"] else ["serve", *argv])
    return int(args.func(args) or 0)
