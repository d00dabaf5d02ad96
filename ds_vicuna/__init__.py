"""ds-vicuna: turn shared chat conversations into a fine-tuned chat model, serve it, and judge it."""
from ds_vicuna.chat.encoding import (IGNORE_INDEX, ConversationEncoder, EncodingError, MaskStrategy,
                                     encode_conversation, encode_prompt, get_encoder)
from ds_vicuna.chat.messages import Message, MessageError, Role, validate_messages
from ds_vicuna.chat.templates import TEMPLATES, TemplateError, add_template_tokens, get_template

__version__ = "0.1.0"
__all__ = ["IGNORE_INDEX", "ConversationEncoder", "EncodingError", "MaskStrategy", "Message", "MessageError", "Role",
           "TEMPLATES", "TemplateError", "add_template_tokens", "encode_conversation", "encode_prompt", "get_encoder",
           "get_template", "validate_messages", "__version__"]
