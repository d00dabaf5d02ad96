"""Conversations as messages, chat templates, and role-masked encoding (the data logic every stage shares).

    messages   Message(role, content), validate_messages, OpenAI/ShareGPT role and content-part rules
    templates  one class per chat template in a name -> class registry
    encoding   messages -> input_ids + labels (assistant-only masks built while tokenizing); serving prompts
"""
