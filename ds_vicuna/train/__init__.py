"""Training stage: config -> tokenized dataset -> micro-batches -> DeepSpeed ZeRO loop -> checkpoints -> export.

    python -m ds_vicuna.train demo --data.train_path data/train.jsonl   # the loop (`ds-vicuna train` is the same)
    ds-vicuna train demo --ranks 2 --data.train_path data/train.jsonl   # local ranks, signals forwarded
    deepspeed --num_gpus 8 --module ds_vicuna.train configs/vicuna_7b.yaml

Modules, in the order a step uses them (the typed Config they read is `ds_vicuna.config`, below every stage,
since `ds-vicuna data stats --config` reads it too):
    dataset            conversations -> tokenized, sharded, memory-mapped cache; weighted mixes
    batching           packed or padded micro-batches, the epoch plan shared by every rank
    build              tokenizer, model (partitioned under ZeRO-3) and the DeepSpeed engine
    lora               LoRA adapters injected with peft (model.lora), QLoRA's 4-bit base (model.quantization)
    packed_attention   SDPA that keeps packed conversations apart
    sequence_parallel  Ulysses sequence parallelism (DeepSpeed's)
    loss               summed cross-entropy over assistant tokens (linear_cross_entropy: chunked lm_head)
    loop               setup -> fit -> evaluate -> save_checkpoint
    metrics            metrics.jsonl, loss plot, MFU, progress bar
    checkpoint         self-describing checkpoints and exact resume; elastic: resume on another world size
    launch_env         rank / world / rendezvous from any launcher; preemption: checkpoint on SIGTERM/SIGUSR1
    export             checkpoint -> plain Hugging Face folder (a LoRA run: peft adapter folder, or --merge)
    cli                `ds-vicuna train` and `python -m ds_vicuna.train`; local_launch: `--ranks N` (free port,
                       SIGTERM/SIGUSR1/SIGINT forwarded to every rank)

Nothing is imported here, so `python -m ds_vicuna.train` installs its stop-signal handler before torch loads.
"""
