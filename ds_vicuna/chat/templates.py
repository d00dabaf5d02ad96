"""Chat templates: one small class per format in a name -> class registry.

Every template is a Jinja `chat_template`, the same text transformers' `apply_chat_template` runs. Training
(`ds_vicuna.chat.encoding`), serving and eval render prompts through it, and export writes it into the tokenizer, so
plain transformers reproduces the training prompt token for token.

    vicuna_v1.1  "<system> USER: <u> ASSISTANT: <a></s>USER: ..."   (FastChat's vicuna_v1.1, exactly)
    chatml       "<|im_start|>user\\n<u><|im_end|>\\n<|im_start|>assistant\\n<a><|im_end|>\\n"
    tokenizer    the model's own Hugging Face chat template
"""
from __future__ import annotations

from typing import Sequence

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class TemplateError(ValueError):
    """A template that cannot be used with this tokenizer (missing tokens or chat template)."""


def adds_bos_token(tokenizer) -> bool:
    """True when the tokenizer puts BOS in front of plain text (Llama does; GPT-2 style BPEs don't)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def special_token_strings(tokenizer) -> dict[str, int]:
    """Every special (control) token of the tokenizer: text -> id."""
    specials = {tok.content: idx for idx, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    for text in tokenizer.all_special_tokens:
        idx = tokenizer.convert_tokens_to_ids(text)
        if idx is not None:
            specials.setdefault(text, idx)
    return specials


def stops_after_reply(tokenizer, template: "ChatTemplate") -> list[str]:
    """The control token a template writes right after an assistant reply (falls back to EOS).

    The same rule the encoder labels stops by: a special token at the very start of the template text that
    follows a reply. Placeholder contents make it hold for any reply.
    """
    reply = "\ue002reply\ue003"
    text = template.render(tokenizer, [{"role": "user", "content": "\ue002user\ue003"},
                                       {"role": "assistant", "content": reply}])
    after = text.split(reply, 1)[1] if reply in text else ""
    for token in sorted(special_token_strings(tokenizer), key=len, reverse=True):
        if token and after.startswith(token):
            return [token]
    return [tokenizer.eos_token] if tokenizer.eos_token else []


class ChatTemplate:
    """A chat format. Subclasses give the Jinja source and the special tokens it relies on."""

    name: str = ""

    def jinja(self, tokenizer) -> str:
        """The Jinja chat template for this tokenizer (what export writes as `chat_template`)."""
        raise NotImplementedError

    def stop_strings(self, tokenizer) -> list[str]:
        """Texts that end an assistant reply (generation stops on them; training labels them)."""
        raise NotImplementedError

    def required_special_tokens(self, tokenizer) -> list[str]:
        """Control tokens the template writes; each must be one special token of the tokenizer."""
        return list(self.stop_strings(tokenizer))

    def render(self, tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The prompt text, rendered by transformers' own chat-template engine."""
        return tokenizer.apply_chat_template(list(messages), chat_template=self.jinja(tokenizer),
                                             add_generation_prompt=add_generation_prompt, tokenize=False)


class VicunaV11(ChatTemplate):
    """FastChat `vicuna_v1.1`: `ret = system + " "; role + ": " + msg + (" " | "</s>")`; prompt ends "ASSISTANT:"."""

    name = "vicuna_v1.1"

    def jinja(self, tokenizer) -> str:
        bos = "{{ bos_token }}" if adds_bos_token(tokenizer) else ""
        return (
            bos
            + "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}"
            "{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}{%- set turns = messages -%}"
            "{%- endif -%}"
            "{{- system + ' ' -}}"
            "{%- for message in turns -%}"
            "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
            "{%- else -%}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
        )

    def stop_strings(self, tokenizer) -> list[str]:
        if tokenizer.eos_token is None:
            raise TemplateError(f"{self.name}: the tokenizer has no eos_token to end assistant replies with")
        return [tokenizer.eos_token]

    def required_special_tokens(self, tokenizer) -> list[str]:
        bos = [tokenizer.bos_token] if adds_bos_token(tokenizer) else []
        return bos + self.stop_strings(tokenizer)


class ChatML(ChatTemplate):
    """ChatML as OpenAI and Qwen/SmolLM write it; a system block only when the conversation has one."""

    name = "chatml"

    def jinja(self, tokenizer) -> str:
        return (
            "{%- for message in messages -%}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
        )

    def stop_strings(self, tokenizer) -> list[str]:
        return ["<|im_end|>"]

    def required_special_tokens(self, tokenizer) -> list[str]:
        return ["<|im_start|>", "<|im_end|>"]


class TokenizerTemplate(ChatTemplate):
    """The model's own Hugging Face chat template (e.g. SmolLM2's ChatML with a default system prompt)."""

    name = "tokenizer"

    def jinja(self, tokenizer) -> str:
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise TemplateError("template 'tokenizer': this tokenizer has no chat_template; "
                                "use --template vicuna_v1.1 or chatml")
        return source

    def stop_strings(self, tokenizer) -> list[str]:
        return stops_after_reply(tokenizer, self)

    def required_special_tokens(self, tokenizer) -> list[str]:
        return []


TEMPLATES: dict[str, type[ChatTemplate]] = {cls.name: cls for cls in (VicunaV11, ChatML, TokenizerTemplate)}


def get_template(template: "str | ChatTemplate") -> ChatTemplate:
    """Look a template up by name (a ChatTemplate passes through).

    Raises:
        TemplateError: unknown name, listing the known ones.
    """
    if isinstance(template, ChatTemplate):
        return template
    try:
        return TEMPLATES[template]()
    except KeyError:
        raise TemplateError(f"unknown chat template {template!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def add_template_tokens(tokenizer, template: "str | ChatTemplate") -> list[str]:
    """Add the template's control tokens the tokenizer lacks (e.g. ChatML on a Llama tokenizer).

    Returns:
        The tokens added; when non-empty the model's embeddings must be resized to `len(tokenizer)`.
    """
    wanted = get_template(template).required_special_tokens(tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing
