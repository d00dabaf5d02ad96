"""Chat templates: exact formats, registry, and the exported-tokenizer round trip."""
from __future__ import annotations

import pytest

from ds_vicuna import TemplateError, encode_conversation, encode_prompt, get_template
from ds_vicuna.chat.templates import TEMPLATES, VICUNA_SYSTEM

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Who are you?"}]


def test_vicuna_v11_is_fastchats_format_exactly(smol_tokenizer, sp_tokenizer):
    # FastChat: ret = system + " "; role + ": " + message + (" " | "</s>"); the prompt ends with "ASSISTANT:"
    expected = VICUNA_SYSTEM + " USER: Hi ASSISTANT: Hello!</s>USER: Who are you? ASSISTANT:"
    assert get_template("vicuna_v1.1").render(sp_tokenizer, CHAT, add_generation_prompt=True) == expected
    # the eos of the tokenizer ends replies (SmolLM2: <|im_end|>)
    smol = get_template("vicuna_v1.1").render(smol_tokenizer, CHAT, add_generation_prompt=True)
    assert smol == expected.replace("</s>", "<|im_end|>")
    system = [{"role": "system", "content": "Be brief."}] + CHAT[:2]
    assert get_template("vicuna_v1.1").render(sp_tokenizer, system) == "Be brief. USER: Hi ASSISTANT: Hello!</s>"


def test_vicuna_adds_bos_only_for_tokenizers_that_use_it(sp_tokenizer, tmp_path):
    from transformers import LlamaTokenizer

    from tests.support.tokenizers import train_sentencepiece

    with_bos = LlamaTokenizer.from_pretrained(train_sentencepiece(tmp_path), add_bos_token=True)
    assert encode_prompt(CHAT, with_bos)[0] == with_bos.bos_token_id
    assert encode_prompt(CHAT, sp_tokenizer)[0] != sp_tokenizer.bos_token_id


def test_chatml_format(smol_tokenizer):
    text = get_template("chatml").render(smol_tokenizer, CHAT, add_generation_prompt=True)
    assert text == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                    "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_template_uses_the_models_own(smol_tokenizer, sp_tokenizer):
    assert get_template("tokenizer").stop_strings(smol_tokenizer) == ["<|im_end|>"]
    with pytest.raises(TemplateError, match="no chat_template"):
        encode_conversation(CHAT[:2], sp_tokenizer, "tokenizer")


def test_unknown_template_lists_known():
    with pytest.raises(TemplateError, match="known: chatml, tokenizer, vicuna_v1.1"):
        get_template("alpaca")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_tokenizer_reproduces_training_ids(smol_tokenizer, tmp_path, name):
    """Export writes the template as chat_template: plain transformers then gives our ids token for token."""
    from transformers import AutoTokenizer

    smol_tokenizer.save_pretrained(tmp_path)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    exported.chat_template = get_template(name).jinja(smol_tokenizer)
    exported.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    conversation = CHAT + [{"role": "assistant", "content": "I am Vicuna.\n```python\nprint('hi')\n```"}]
    ids = encode_conversation(conversation, smol_tokenizer, name)["input_ids"]
    assert list(reloaded.apply_chat_template(conversation, tokenize=True, return_dict=False)) == ids
    prompt = reloaded.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(prompt) == encode_prompt(CHAT, smol_tokenizer, name)
