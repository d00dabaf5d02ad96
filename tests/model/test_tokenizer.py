"""ds_vicuna.model.tokenizer: split, stats and the trainer measure and encode with one tokenizer."""
import ds_vicuna.data.split as split
import ds_vicuna.train.build as build
import ds_vicuna.train.loop as loop
from ds_vicuna.chat.encoding import encode_conversation
from ds_vicuna.chat.messages import Message, Role
from ds_vicuna.data.split import Splitter
from ds_vicuna.model.tokenizer import load_tokenizer
from tests.support.tiny_llama import make_tiny_model

CHAT = [{"role": "user", "content": "alpha beta <|im_end|> gamma"}, {"role": "assistant", "content": "river stone"}]


def test_split_and_training_get_the_same_tokenizer(tmp_path):
    """The tiny Llama lacks ChatML's tokens: both load paths add them as the same special ids, set the same pad
    token, and give the same ids for text holding them; split's measured length is training's encoded length."""
    assert loop.load_tokenizer is load_tokenizer  # the trainer's; data split/stats import it the same way
    assert not hasattr(split, "load_tokenizer") and not hasattr(build, "load_tokenizer")
    folder = make_tiny_model(tmp_path / "tiny")
    for_split = load_tokenizer(str(folder), "chatml")  # `data split --model FOLDER`
    for_training = load_tokenizer(folder, "chatml")  # the trainer passes the resolved Path
    assert len(for_split) == len(for_training) > 400
    added = ["<|im_start|>", "<|im_end|>"]
    assert for_split.convert_tokens_to_ids(added) == for_training.convert_tokens_to_ids(added) == [400, 401]
    assert for_split.pad_token == for_training.pad_token == for_training.eos_token
    text = "<|im_start|>user\nalpha beta<|im_end|>\n"
    assert for_split(text)["input_ids"] == for_training(text)["input_ids"]
    assert 400 in for_training(text)["input_ids"]
    encoded = encode_conversation(CHAT, for_training, "chatml")
    messages = [Message(Role(m["role"]), m["content"]) for m in CHAT]
    assert Splitter(for_split, "chatml", 512).length(messages) == len(encoded["input_ids"])



def test_template_auto_takes_the_tokenizers_own_else_vicuna(tmp_path):
    from transformers import AutoTokenizer

    from ds_vicuna.model.tokenizer import resolve_template

    plain = make_tiny_model(tmp_path / "plain")
    assert resolve_template("auto", plain) == (
        "vicuna_v1.1", "template auto: the tokenizer has no chat template, so vicuna_v1.1")
    assert resolve_template("chatml", plain) == ("chatml", "as configured")
    own = tmp_path / "own"
    tokenizer = AutoTokenizer.from_pretrained(plain)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(own)
    (own / "config.json").write_text((plain / "config.json").read_text())
    assert resolve_template("auto", own)[0] == "tokenizer"


def test_max_length_is_checked_against_the_models_positions(tmp_path):
    import pytest

    from ds_vicuna.model.tokenizer import check_max_length, model_positions

    model = make_tiny_model(tmp_path / "tiny")
    assert model_positions(model) == 512
    check_max_length(model, 512)
    check_max_length(model, 2048, rope_scaling="linear")  # RoPE scaling stretches the model to it
    with pytest.raises(ValueError, match=r"--max-length 1024 is more than the 512 positions of model .*tiny"):
        check_max_length(model, 1024, name="--max-length")
