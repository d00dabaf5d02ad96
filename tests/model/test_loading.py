"""The one chat-model loader: model card, device/dtype policy, stops, context length, reply lead, and its callers."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from tests.support.tiny_llama import make_tiny_model

from ds_vicuna.model import loading as chat_model
from ds_vicuna.model.loading import ChatModel, load_chat_model, resolve_device, resolve_dtype, stop_token_ids
from ds_vicuna.model.card import META_FILE, ModelCard, read_model_card, read_model_meta, write_model_meta
from ds_vicuna.chat.templates import TemplateError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random Llama (context 512) with a sentencepiece tokenizer and a vicuna_v1.1 model card."""
    folder = make_tiny_model(tmp_path_factory.mktemp("chat") / "tiny-vicuna")
    write_model_meta(folder, "vicuna_v1.1", ["</s>"], max_length=256, base_model="tiny", step=3, dtype="fp32")
    return folder


# ---- the model card ---------------------------------------------------------------------------------------
def test_card_round_trip_defaults_and_field_errors(tmp_path):
    assert read_model_card(tmp_path) == ModelCard() and read_model_meta(tmp_path) == {"template": "tokenizer"}
    write_model_meta(tmp_path, "chatml", ["<|im_end|>"], max_length=1024, context_length=4096, base_model="b",
                     step=10, dtype="bf16", note="kept")
    card = read_model_card(tmp_path)
    assert card == ModelCard("chatml", ("<|im_end|>",), 1024, 4096, "b", 10, "bf16", {"note": "kept"})
    assert read_model_meta(tmp_path)["note"] == "kept"  # the dict reader older callers use still works
    for field, value in (("template", 3), ("stop_strings", "</s>"), ("max_length", 0), ("context_length", "4k"),
                         ("step", -1), ("dtype", "half"), ("base_model", 1)):
        raw = {"template": "chatml", "stop_strings": [], field: value}
        (tmp_path / META_FILE).write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=rf"{META_FILE}: field '{field}'"):
            read_model_card(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_model_card(tmp_path)
    with pytest.raises(ValueError, match="field 'step'"):
        write_model_meta(tmp_path, "chatml", [], step="ten")  # a card that would not load is never written


# ---- loading ----------------------------------------------------------------------------------------------
def test_loads_a_checkpoint_as_its_card_says(tiny_dir, tmp_path):
    chat = load_chat_model(str(tiny_dir), device="cpu")
    assert (chat.name, chat.template, chat.stop_strings, chat.reply_lead) == ("tiny-vicuna", "vicuna_v1.1",
                                                                             ["</s>"], " ")
    assert chat.stop_token_ids == [2] and chat.context_length == 512  # EOS; the config's position limit
    assert chat.card.step == 3 and chat.card.max_length == 256
    assert chat.device == torch.device("cpu") and chat.dtype == torch.float32
    assert chat.model.config._attn_implementation == "sdpa" and not chat.model.training
    prompt = chat.encoder.encode_prompt([{"role": "user", "content": "apple river"}])
    assert chat.tokenizer.decode(prompt).endswith("USER: apple river ASSISTANT:")
    # the card's context_length wins; a name can be given; bf16 on request
    write_model_meta(tiny_dir, "vicuna_v1.1", ["</s>"], context_length=300)
    try:
        chat = load_chat_model(str(tiny_dir), name="served-name", device="cpu", dtype="bf16")
        assert (chat.name, chat.context_length, chat.dtype) == ("served-name", 300, torch.bfloat16)
    finally:
        write_model_meta(tiny_dir, "vicuna_v1.1", ["</s>"], max_length=256, base_model="tiny", step=3, dtype="fp32")
    with pytest.raises(TemplateError, match="chatml"):  # an override the tokenizer cannot do is named
        load_chat_model(str(tiny_dir), template="chatml", device="cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_chat_model(str(tmp_path / "missing"))


def test_stop_ids_and_lead_come_from_the_template(smol_tokenizer):
    from tests.support.serve_helpers import random_llama

    model = random_llama(smol_tokenizer)
    model.generation_config.eos_token_id = [2, 7]
    own = ChatModel.build(model, smol_tokenizer, None, "m")  # no card: the tokenizer's own (ChatML) template
    assert (own.template, own.stop_strings, own.reply_lead) == ("tokenizer", ["<|im_end|>"], "")
    assert own.stop_token_ids == [2, 7]  # the stop token, EOS, and generation_config's EOS ids
    card = ModelCard("vicuna_v1.1", ("<|im_end|>", "USER:"))
    vicuna = ChatModel.build(model, smol_tokenizer, None, "m", card)
    assert vicuna.stop_strings == ["<|im_end|>", "USER:"] and vicuna.reply_lead == " "
    assert stop_token_ids(smol_tokenizer, ["USER:", "<|im_start|>"]) == [1, 2]  # text stops are no ids


def test_device_and_dtype_policy(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="--device cuda:1: no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="--device: expected auto, cuda, cuda:N or cpu, got 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="--dtype: expected one of auto, bf16, fp16, fp32"):
        resolve_dtype("half", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 1) == resolve_device("cuda")  # respects the current GPU
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    capability = {0: (8, 0), 1: (7, 0)}  # an A100 and a V100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device.index])
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.float16
    assert resolve_dtype("fp32", torch.device("cuda", 0)) == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_asking_for_a_gpu_without_one_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is visible"):
        load_chat_model(str(tiny_dir), device="cuda")
    with pytest.raises(ValueError, match="--device-map: expected one of auto"):
        load_chat_model(str(tiny_dir), device_map="everywhere")


# ---- every caller uses it -----------------------------------------------------------------------------------
def test_worker_eval_and_demo_all_load_through_it(tiny_dir, monkeypatch, tmp_path):
    from ds_vicuna import demo
    from ds_vicuna.eval.answer import LocalBackend
    from ds_vicuna.serve import cli as serve_cli

    calls = []
    real = chat_model.load_chat_model

    def spy(model, template=None, name=None, device="auto", dtype="auto", device_map=None, **kwargs):
        calls.append((device, dtype, device_map))
        return real(model, template, name, device=device, dtype=dtype, device_map=device_map, **kwargs)

    monkeypatch.setattr(chat_model, "load_chat_model", spy)
    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "worker", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32",
                              "--prefill-chunk", "64"])
    worker = serve_cli._build_worker(args, None, "http://127.0.0.1:1", None)
    assert worker.engine.prefill_chunk == 64 and worker.loaded.template == "vicuna_v1.1"
    backend = LocalBackend(str(tiny_dir), max_new_tokens=4, device="cpu", dtype="bf16")
    assert backend.chat.dtype == torch.bfloat16
    assert isinstance(demo.answer(tiny_dir, "apple river", max_new_tokens=4), str)
    assert calls == [("cpu", "fp32", None), ("cpu", "bf16", None), ("auto", "auto", None)]
    args = parser.parse_args(["serve", "worker", "--model", str(tiny_dir), "--device", "tpu"])
    with pytest.raises(SystemExit, match="ds-vicuna serve: error: --device: expected"):
        serve_cli._build_worker(args, None, "http://127.0.0.1:1", None)


def test_local_answers_equal_plain_transformers_generate(tiny_dir):
    """`eval answer --model` replies (the worker's engine, batched) equal greedy `model.generate` one at a time."""
    from ds_vicuna.eval.answer import LocalBackend

    backend = LocalBackend(str(tiny_dir), max_new_tokens=12, device="cpu", dtype="fp32")
    chat = backend.chat
    conversations = [[{"role": "user", "content": "apple river stone"}],
                     [{"role": "user", "content": "seven"}, {"role": "assistant", "content": "tiger horse"},
                      {"role": "user", "content": "quick slow happy quiet eagle"}]]
    replies = backend.generate(conversations)
    assert all(len(reply) > 10 for reply in replies)  # real text, not two empty replies
    for conversation, reply in zip(conversations, replies):
        prompt = torch.tensor([chat.encoder.encode_prompt(conversation)])  # [1, T]
        with torch.no_grad():
            out = chat.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                      do_sample=False, eos_token_id=chat.stop_token_ids, pad_token_id=0)
        new = out[0, prompt.shape[1]:].tolist()
        new = new[:next((i for i, t in enumerate(new) if t in chat.stop_token_ids), len(new))]
        assert reply == chat.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_eval_answer_names_a_bad_device(tiny_dir, tmp_path, capsys):
    from ds_vicuna.eval.cli import main

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "generic", "text": "apple"}) + "\n")
    code = main(["answer", "--questions", str(questions), "--model", str(tiny_dir), "--device", "cuda:7",
                 "--out", str(tmp_path / "a.jsonl"), "--quiet"])
    assert code == 2 and "--device cuda:7" in capsys.readouterr().err
