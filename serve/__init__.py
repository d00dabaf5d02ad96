"""Serving (`ds_vicuna.serve`): controller, batched model workers, OpenAI-compatible API and a web chat page.

    ds-vicuna serve all --model embedded --port 8000     # then: OpenAI(base_url="http://127.0.0.1:8000/v1")

Modules, bottom up (each imports only the ones above it):

    errors           ErrorCode + APIError: the one error vocabulary (OpenAI's error shape) of every server
    sampling         SamplingParams and THE table of sampling options with their defaults and limits
    worker_events    the worker -> API stream: TextEvent / DoneEvent / ErrorEvent, one encoder, one parser
    openai_protocol  OpenAI request parsing (into one GenerationOptions with its SamplingParams) and responses
    detokenizer      IncrementalText: token ids -> final text pieces, stop strings across tokens
    kv_cache         cutting rows out of a batch's KV cache and stacking two batches
    jobs             GenerationJob (prompt ids, SamplingParams, event queue) and chat_job
    multi_lora       many LoRA adapters over one base, each row of a batch with its own (AdapterRouting)
    engine           BatchEngine: continuous batching with chunked prefill on one causal LM
    generate         generate_replies: offline replies with the engine (eval answer, the demo)
    http_util        what every Flask app shares: error handlers, the worker secret, JSON bodies, waitress
    metrics          Prometheus metrics of the API and the workers (JobObserver: one job's events -> metrics)
    admission        the API's limits before any work: jobs per request (400), requests in flight (429)
    moderation       the input filter (blocked words, a moderation endpoint)
    controller       the worker registry and router (least loaded worker per model)
    worker           Worker: a model, its scheduler thread and heartbeats, and its Flask app
    routing          the API's controller/worker client: worker choice, failover, a request's jobs in one call
    serving          ChatService: the chat/completions logic (parse -> moderate -> route -> respond)
    api_router       APIConfig + create_app: thin Flask handlers of the OpenAI-compatible API and the chat page
    cli              `ds-vicuna serve ...` and `ds-vicuna chat`
"""
