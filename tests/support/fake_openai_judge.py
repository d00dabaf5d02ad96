"""A scripted OpenAI-compatible chat server for eval tests (127.0.0.1, free port, stdlib only).

    python tests/support/fake_openai_judge.py [--delay 0.1]     # prints "PORT <n>" once listening

Replies are driven by markers inside the prompt text, so concurrent requests stay deterministic:
- `quality=N` in an answer: a judge prompt scores that assistant N (its last marker in a conversation).
  Vicuna's review prompts get two scores (`8 6`, or `Assistant 1: 8` lines for math); FastChat's MT-bench
  pairwise prompts a verdict (`[[A]]`, `[[B]]`, `[[C]]` for equal quality); single-answer prompts
  `Rating: [[N]]`.
- `#fake:bias`: the first-shown assistant gets +1 (position bias), `#fake:garbage`: an unparseable judgment.
- `#fake:400xK` / `#fake:429xK` / `#fake:500xK`: the first K requests with this exact prompt fail with that status;
  `#fake:429xKra` adds `Retry-After: 1`; `#fake:slowxK`: the first K requests sleep 2 s first.
Non-judge prompts get `reply to: <question> (messages=M)`; a requested model named `...-qN` adds
`quality=Q` with Q = N-1, N or N+1 chosen by a hash of the prompt and model (answers differ per question).
GET /stats returns request counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_SECONDS = 2.0
_FAIL = re.compile(r"#fake:(400|429|500|slow)x(\d+)(ra)?")


class FakeJudgeState:
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.lock = threading.Lock()
        self.per_prompt: dict[str, int] = {}
        self.statuses: dict[str, int] = {}
        self.auth: set[str] = set()

    def seen(self, content: str) -> int:
        """How many requests with this prompt came before this one."""
        key = hashlib.sha1(content.encode()).hexdigest()
        with self.lock:
            count = self.per_prompt.get(key, 0)
            self.per_prompt[key] = count + 1
            return count

    def count(self, status: int) -> None:
        with self.lock:
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1


def _quality(block: str) -> int:
    found = re.findall(r"quality=(\d+)", block)
    return int(found[-1]) if found else 5


def _between(text: str, start: str, end: str) -> str:
    i = text.find(start)
    return text[i + len(start): text.find(end, i)] if i >= 0 else ""


def judge_reply(content: str) -> str | None:
    """The scripted judgment for a prompt (the last user message), or None for a non-judge prompt."""
    if "#fake:garbage" in content:
        return "I am unable to compare these answers, sorry."
    pair_blocks = [_between(content, f"[The Start of Assistant {n}'s Answer]", f"[The End of Assistant {n}'s Answer]")
                   or _between(content, f"<|The Start of Assistant {n}'s Conversation",
                               f"<|The End of Assistant {n}'s Conversation") for n in ("A", "B")]
    if pair_blocks[1]:  # FastChat's pairwise prompts: a verdict
        first, second = _quality(pair_blocks[0]), _quality(pair_blocks[1])
        if "#fake:bias" in content:
            first = min(10, first + 1)
        verdict = "A" if first > second else "B" if second > first else "C"
        return f"Assistant A is {first}/10, assistant B {second}/10.\nFinal verdict: [[{verdict}]]"
    if pair_blocks[0]:  # FastChat's single multi-turn prompts label the one assistant "A"
        return f"A fair conversation.\nRating: [[{_quality(pair_blocks[0])}]]"
    if "[The Start of Assistant 1's" in content or "<|The Start of Assistant 1's" in content:
        blocks = []
        for n in (1, 2):
            blocks.append(_between(content, f"[The Start of Assistant {n}'s Answer]",
                                   f"[The End of Assistant {n}'s Answer]")
                          or _between(content, f"<|The Start of Assistant {n}'s Conversation",
                                      f"<|The End of Assistant {n}'s Conversation"))
        first, second = _quality(blocks[0]), _quality(blocks[1])
        if "#fake:bias" in content:
            first = min(10, first + 1)
        if "mathematical proficiency" in content:
            return f"I solve it myself first.\nBoth checked.\nAssistant 1: {first}\nAssistant 2: {second}"
        return f"{first} {second}\nAssistant 1 and Assistant 2 were compared carefully."
    if "[The Start of Assistant's Answer]" in content or "<|The Start of Assistant's Conversation" in content:
        block = content.split("The Start of Assistant's", 1)[1]
        return f"A fair answer.\nRating: [[{_quality(block)}]]"
    return None


def make_handler(state: FakeJudgeState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            # counted before the reply goes out: a client that has its answer must find it counted
            state.count(status)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                return

        def do_GET(self):
            if self.path == "/health":
                return self._send(200, {"status": "ok"})
            with state.lock:
                stats = {"statuses": dict(state.statuses), "auth": sorted(state.auth)}
            self._send(200, stats)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            with state.lock:
                state.auth.add(self.headers.get("Authorization", ""))
            messages = body["messages"]
            content = messages[-1]["content"]
            if state.delay:
                time.sleep(state.delay)
            previous = state.seen(content)
            for kind, times, retry_after in _FAIL.findall(content):
                if previous < int(times):
                    if kind == "slow":
                        time.sleep(SLOW_SECONDS)
                        break
                    headers = {"Retry-After": "1" if retry_after else "0"} if kind == "429" else {}
                    return self._send(int(kind), {"error": {"message": f"scripted {kind}"}}, headers)
            text = judge_reply(content)
            if text is None:
                text = f"reply to: {content[:40]} (messages={len(messages)})"
                level = re.search(r"-q(\d+)$", str(body.get("model", "")))
                if level:
                    seed = (content + str(body.get("model"))).encode()
                    jitter = int(hashlib.sha1(seed).hexdigest(), 16) % 3 - 1
                    text += f" quality={max(1, min(10, int(level.group(1)) + jitter))}"
            self._send(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}]})

    return Handler


def start_server(delay: float = 0.0) -> tuple[ThreadingHTTPServer, FakeJudgeState]:
    """Serve on a free 127.0.0.1 port in a daemon thread; call `server.shutdown()` to stop."""
    state = FakeJudgeState(delay)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    server, _ = start_server(parser.parse_args().delay)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        sys.exit(0)
