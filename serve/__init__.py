"""Serving (`ds_vicuna.serve`): controller, batched model workers, OpenAI-compatible API and a web chat page.

    ds-vicuna serve all --model embedded --port 8000     # then: OpenAI(base_url="http://127.0.0.1:8000/v1")

Modules: `schemas` (request/response types, ErrorCode), `engine` (continuous batching), `worker`, `controller`,
`api`, `moderation`, `cli`.
"""
