"""Many LoRA adapters over one base: rows of different adapters and of the base share batches and each gets the
greedy answer of its own merged model; bad adapter folders are refused naming the file; the worker serves each
adapter as a model name. Adapters are made with plain peft (random A and B) on a tiny Llama."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from tests.support.serve_helpers import collect
from tests.support.tiny_llama import make_adapter, make_tiny_model

from ds_vicuna.model.adapters import AdapterError, load_adapter, merge_into, parse_adapter_arg
from ds_vicuna.model.loading import load_chat_model
from ds_vicuna.serve.engine import BatchEngine
from ds_vicuna.serve.errors import APIError
from ds_vicuna.serve.jobs import GenerationJob
from ds_vicuna.serve.multi_lora import install_adapters, load_adapter_models
from ds_vicuna.serve.sampling import SamplingParams

ADAPTERS = {"all": (4, "all-linear"), "qv": (8, ["q_proj", "v_proj"]), "mlp": (2, ["down_proj"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_lora")
    model_dir = make_tiny_model(tmp / "model")
    folders = {name: make_adapter(model_dir, tmp / name, r, targets, seed)
               for seed, (name, (r, targets)) in enumerate(ADAPTERS.items())}
    return tmp, model_dir, folders


def merged_model(model_dir, folder):
    """peft's own merge of one adapter into a fresh copy of the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, folder).merge_and_unload().eval()


def greedy_jobs(prompts, max_tokens=10, adapter=None):
    return [GenerationJob(list(p), SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter=adapter)
            for p in prompts]


def test_mixed_batches_equal_each_merged_model_alone(setup):
    tmp, model_dir, folders = setup
    chat = load_chat_model(str(model_dir), template="vicuna_v1.1", device="cpu")
    adapters = [load_adapter(name, folder, chat.model) for name, folder in folders.items()]
    routing = install_adapters(chat.model, adapters)
    engine = BatchEngine(chat.model, chat.tokenizer, [2], max_batch_size=8)
    engine.routing = routing
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (5, 9, 3, 12, 7, 4, 10, 6)]
    names = [None, "all", "qv", "mlp", "all", None, "mlp", "qv"]
    jobs = [greedy_jobs([p], adapter=n)[0] for p, n in zip(prompts, names)]
    engine.add(jobs[:5])  # continuous batching: three more join while the first five decode
    engine.step()
    engine.step()
    engine.add(jobs[5:])
    while engine.active:
        engine.step()
    mixed = [collect(job) for job in jobs]
    expected = {}
    for name in (None, *folders):
        model = merged_model(model_dir, folders[name]) if name else \
            load_chat_model(str(model_dir), template="vicuna_v1.1", device="cpu").model
        alone = BatchEngine(model, chat.tokenizer, [2], max_batch_size=8)
        mine = [i for i, n in enumerate(names) if n == name]
        own = greedy_jobs([prompts[i] for i in mine])
        alone.run_batch(own)
        expected.update({i: collect(job) for i, job in zip(mine, own)})
    assert [text for text, _ in mixed] == [expected[i][0] for i in range(len(jobs))]
    assert [done.completion_tokens for _, done in mixed] == [expected[i][1].completion_tokens for i in range(len(jobs))]
    assert len({text for text, _ in mixed[:4]}) == 4  # the adapters do change the answers


def test_merge_into_equals_peft_merge(setup):
    _, model_dir, folders = setup
    chat = load_chat_model(str(model_dir), template="vicuna_v1.1", device="cpu")
    merge_into(chat.model, load_adapter("qv", folders["qv"], chat.model))
    reference = merged_model(model_dir, folders["qv"])
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(chat.model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def test_bad_adapters_are_refused_naming_the_file(setup):
    tmp, model_dir, folders = setup
    chat = load_chat_model(str(model_dir), template="vicuna_v1.1", device="cpu")
    missing = tmp / "missing"
    shutil.copytree(folders["all"], missing)
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=f"{missing}/adapter_model.safetensors not found"):
        load_adapter("missing", missing, chat.model)
    wrong_rank = tmp / "wrong_rank"
    shutil.copytree(folders["qv"], wrong_rank)
    config = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    with pytest.raises(AdapterError, match=r"wrong_rank/adapter_model.safetensors: .*q_proj.lora_A has rank 8 but "
                                           r".*wrong_rank/adapter_config.json says r=16"):
        load_adapter("wrong_rank", wrong_rank, chat.model)
    other_base = make_tiny_model(tmp / "other_base", hidden=32)
    foreign = make_adapter(other_base, tmp / "foreign", 4, ["q_proj"], 5)
    with pytest.raises(AdapterError, match=r"foreign/adapter_model.safetensors: model.layers.0.self_attn.q_proj "
                                           r"adapts a \[32 x 32\] layer but the base's is \[64 x 64\]"):
        load_adapter("foreign", foreign, chat.model)
    with pytest.raises(AdapterError, match="NAME=PATH"):
        parse_adapter_arg("no-equals-sign")


def test_worker_serves_each_adapter_as_a_model_name(setup):
    from ds_vicuna.serve.worker import Worker

    _, model_dir, folders = setup
    base = load_chat_model(str(model_dir), template="vicuna_v1.1", name="tiny", device="cpu")
    adapters, routing = load_adapter_models(base, [("all", str(folders["all"])), ("qv", str(folders["qv"]))])
    assert [a.name for a in adapters] == ["all", "qv"] and routing.names == ["", "all", "qv"]
    worker = Worker(base, "http://127.0.0.1:1", None, http=None, adapters=adapters, routing=routing)
    assert list(worker.models) == ["tiny", "all", "qv"]
    body = {"messages": [{"role": "user", "content": "alpha beta"}], "params": {"max_tokens": 6, "temperature": 0}}
    jobs = {name: worker.make_job({**body, "model": name}) for name in ("tiny", "all", "qv")}
    assert [j.adapter for j in jobs.values()] == [None, "all", "qv"]
    with pytest.raises(APIError, match="serves all, qv, tiny, not 'nope'"):
        worker.make_job({**body, "model": "nope"})
    worker.start()
    try:
        for job in jobs.values():
            worker.submit(job)
        texts = {name: "".join(e.text for e in worker.stream(job) if hasattr(e, "text")) for name, job in jobs.items()}
    finally:
        worker.stop()
    assert len(set(texts.values())) == 3  # each name got its own model
    with pytest.raises(AdapterError, match="used twice"):
        load_adapter_models(base, [("tiny", str(folders["all"]))])


def test_serve_refuses_to_start_with_a_bad_adapter(setup, capsys):
    from ds_vicuna.serve.cli import main

    tmp, model_dir, _ = setup
    with pytest.raises(SystemExit, match=f"ds-vicuna serve: error: adapter 'x': {tmp}/nowhere/adapter_config.json "
                                         "not found"):
        main(["worker", "--model", str(model_dir), "--template", "vicuna_v1.1", "--port", "0",
              "--adapter", f"x={tmp}/nowhere"])
