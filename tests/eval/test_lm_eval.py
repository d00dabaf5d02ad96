"""lm-evaluation-harness's `local-completions` model against our server, on a small multiple-choice task defined
from local files. Its log-likelihood of every choice must equal what lm-eval's own `hf` model computes on the same
weights: prompt scoring through the API (token-id prompts, echo + logprobs) is exact.

    pip install -e '.[harness]'          # lm-eval is an optional extra; these tests skip without it
    lm_eval --model local-completions --tasks TASK --include_path DIR --model_args \\
        model=NAME,base_url=http://127.0.0.1:8000/v1/completions,tokenizer=MODEL_DIR,tokenizer_backend=huggingface

The first test scores through the API with a worker that computes log-probabilities with the model itself (what
the worker contract asks of the engine); the second runs the real `serve all` stack.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from ds_vicuna.serve.api_router import APIConfig, create_app
from ds_vicuna.serve.controller import Controller
from ds_vicuna.serve.controller import create_app as controller_app
from ds_vicuna.serve.worker_events import DoneEvent, TextEvent, TokenLogprob, to_line
from tests.support.serve_fakes import CONTROLLER, FakeHTTP, FakeResponse, save_tiny_checkpoint, serve_app

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[harness]'")
pytestmark = pytest.mark.slow

TASK = "dsv_tiny_mc"
QUESTIONS = [("What colour is the sky on a clear day?", ["blue", "green", "red"], 0),
             ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
             ("Which is a fruit?", ["carrot", "potato", "apple"], 2),
             ("What do bees make?", ["honey", "milk", "silk"], 0),
             ("Which animal barks?", ["cat", "dog", "fish"], 1)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_smol"), smol_tokenizer)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return folder


def evaluate(task_dir: Path, model: str, model_args: dict) -> dict:
    """Run lm-eval on the task; returns {doc_id: [(loglikelihood, is_greedy) per choice]} and the accuracy."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                                      task_manager=TaskManager(include_path=str(task_dir)))
    scores = {s["doc_id"]: [(float(ll), bool(greedy)) for ll, greedy in s["filtered_resps"]]
              for s in results["samples"][TASK]}
    return {"scores": scores, "acc": results["results"][TASK]["acc,none"]}


@pytest.fixture(scope="module")
def reference(model_dir, task_dir) -> dict:
    """lm-eval's own `hf` model on the same weights: the numbers the server must reproduce."""
    return evaluate(task_dir, "hf", {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu",
                                     "batch_size": 1})


class ScoringWorker:
    """A worker that honours the contract's logprobs and echo with one forward pass of the real model:
    `prompt_logprobs` for every prompt token (the first None), then one greedy token with its logprob."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def entry(self, logprobs, token_id: int, top: int) -> TokenLogprob:
        best = logprobs.topk(top) if top else None
        alternatives = () if best is None else tuple(
            (self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(best.values, best.indices))
        return TokenLogprob(self.tokenizer.decode([token_id]), float(logprobs[token_id]), alternatives)

    def __call__(self, body: dict) -> FakeResponse:
        import torch

        ids, params = body["prompt_ids"], body["params"]
        with torch.no_grad():
            logprobs = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [T, V]
        top = params["top_logprobs"]
        prompt = (TokenLogprob(self.tokenizer.decode([ids[0]]), None),) + tuple(
            self.entry(logprobs[i - 1], ids[i], top) for i in range(1, len(ids)))
        lines = []
        if params["max_tokens"]:
            token = int(logprobs[-1].argmax())
            lines.append(to_line(TextEvent(self.tokenizer.decode([token]), (self.entry(logprobs[-1], token, top),))))
        lines.append(to_line(DoneEvent("length", len(ids), len(lines),
                                       prompt_logprobs=prompt if params["echo"] and params["logprobs"] else ())))
        return FakeResponse(200, lines=lines)


def assert_same_scores(got: dict, want: dict) -> None:
    assert got["scores"].keys() == want["scores"].keys() and len(want["scores"]) == len(QUESTIONS)
    for doc_id, choices in want["scores"].items():
        assert [greedy for _, greedy in got["scores"][doc_id]] == [greedy for _, greedy in choices], doc_id
        assert [ll for ll, _ in got["scores"][doc_id]] == pytest.approx([ll for ll, _ in choices], abs=1e-3), doc_id
    assert got["acc"] == want["acc"]


def local_completions(base: str, model_dir: Path, model: str) -> dict:
    return {"model": model, "base_url": f"{base}/v1/completions", "tokenizer": str(model_dir),
            "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1, "batch_size": 1}


def test_lm_eval_local_completions_scores_through_the_api(model_dir, task_dir, reference):
    controller = Controller(heartbeat_expiry=60, registration_grace=0)
    controller.register("http://scorer", ["tiny"])
    http = FakeHTTP(controller_app(controller).test_client(), {"http://scorer": ScoringWorker(model_dir)})
    with serve_app(create_app(APIConfig(CONTROLLER), http=http)) as base:
        got = evaluate(task_dir, "local-completions", local_completions(base, model_dir, "tiny"))
    assert_same_scores(got, reference)
    params = http.payloads[0]["params"]
    assert params["echo"] and params["logprobs"] and params["max_tokens"] == 1 and "prompt_ids" in http.payloads[0]


def test_lm_eval_local_completions_against_the_real_stack(model_dir, task_dir, reference):
    from ds_vicuna.train.launch_env import free_port
    from test_serve_stack import start, stop

    port = free_port()
    proc, _ = start(["all", "--model", str(model_dir), "--model-name", "tiny", "--port", str(port),
                     "--torch-threads", "1"], ready="ds-vicuna API ready at")
    try:
        got = evaluate(task_dir, "local-completions", local_completions(f"http://127.0.0.1:{port}", model_dir,
                                                                          "tiny"))
    finally:
        stop(proc)
    assert_same_scores(got, reference)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-ra"]))
