"""Ulysses sequence parallelism through DeepSpeed's own implementation (Arctic Long Sequence Training).

    deepspeed --num_gpus 8 --module ds_vicuna.train configs/vicuna_13b_16k.yaml --train.sequence_parallel_size 4

With `train.sequence_parallel_size: N` every packed row is split into N consecutive shards of its tokens, one per
rank of a sequence-parallel group; DeepSpeed's `UlyssesSPAttentionHF` swaps the sharding from tokens to attention
heads around each attention call (all-to-all), so attention still sees the whole row while every other layer and
the activations hold 1/N of it. The world is `data-parallel size x N`; each group of N consecutive ranks trains
the same micro-batches (the plan is a pure function, so every rank can build and shard the row itself: nothing is
gathered, unlike DeepSpeed's DataLoader adapter, which exists for loaders that differ per rank).

    mpu = register_ulysses(model, sp_size=2, rows=2)       # after init_distributed, before deepspeed.initialize
    engine = deepspeed.initialize(..., mpu=mpu)
    shard = shard_batch(batch, sp_rank, sp_size=2, pad_token_id=0, rows=2)

Labels are shifted on the whole row before sharding (`shift_labels`): a shard cannot see its neighbour's first
token, which its last token must predict. The loss (`ds_vicuna.train.loss.token_loss_sum`) uses them as they are.

Packed conversations stay isolated: DeepSpeed drops the mask transformers builds for the shard and passes the
gathered row's `position_ids` to the core attention. flash_attention_2 reads the conversation boundaries from
them itself (varlen); SDPA (CPU, or no flash-attn) runs as `ds_vicuna.train.packed_attention.PACKED_SDPA`, which
reads them too. DeepSpeed 0.19's flex_attention path rebuilds a plain causal mask, and eager is refused.
"""
from __future__ import annotations

from ds_vicuna.config import ConfigError
from ds_vicuna.chat.encoding import IGNORE_INDEX
from ds_vicuna.train.packed_attention import PACKED_SDPA

SUPPORTED_ATTENTION = ("flash_attention_2", "flash_attention_3", "sdpa", PACKED_SDPA)


def check_sequence_parallel(sp_size: int, world_size: int, model_config, attn_implementation: str,
                            ds: dict) -> None:
    """Everything that would make Ulysses fail or train wrong later, named now.

    Raises:
        ConfigError: the world or the attention heads do not split into `sp_size` groups, an attention
            implementation that cannot keep packed conversations apart under sequence parallelism, or a DeepSpeed
            config other than ZeRO-3 with reduce-scatter (DeepSpeed 0.19 averages gradients over all ranks there,
            over the data-parallel replicas on its other paths; the trainer's loss scale assumes the former).
    """
    if sp_size == 1:
        return
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3 or zero.get("reduce_scatter", True) is False:
        raise ConfigError("train.sequence_parallel_size > 1 needs ZeRO stage 3 with reduce_scatter "
                          "(ds_configs/zero3.json or zero3_offload.json); train.deepspeed has stage "
                          f"{zero.get('stage')}, reduce_scatter {zero.get('reduce_scatter', True)}")
    if world_size % sp_size:
        raise ConfigError(f"train.sequence_parallel_size {sp_size} must divide the world size {world_size}")
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if heads % sp_size or (kv_heads % sp_size and sp_size % kv_heads):
        raise ConfigError(f"train.sequence_parallel_size {sp_size}: the model has {heads} attention heads and "
                          f"{kv_heads} key/value heads; Ulysses needs the heads divisible by it (and the key/value "
                          "heads divisible by it or it by them)")
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise ConfigError(f"model.attn_implementation {attn_implementation} cannot keep packed conversations apart "
                          "under train.sequence_parallel_size > 1; use sdpa or flash_attention_2")


def register_ulysses(model, sp_size: int, rows: int):
    """Put DeepSpeed's Ulysses attention around the model's core attention and build the sequence-parallel groups.

    Call once per process, after the process group is up and before `deepspeed.initialize(..., mpu=mpu)`.

    Args:
        model: the loaded Hugging Face model (its `_attn_implementation` is the core that gets wrapped).
        sp_size: ranks per sequence-parallel group.
        rows: rows per micro-batch as the model sees them (1 when packed rows are flattened for flash attention).

    Returns:
        DeepSpeed's `parallel_state_sp` module (the `mpu`).
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=model.config._attn_implementation,
        sequence_parallel_size=sp_size, micro_batch_size=rows, seq_length_is_variable=True)


def shard_batch(batch: dict, sp_rank: int, sp_size: int, pad_token_id: int, rows: int) -> dict:
    """This rank's shard of a collated micro-batch: `input_ids`, `position_ids`, `shift_labels` [rows, T / sp].

    The row is padded to a multiple of `sp_size` (and the batch to `rows` rows, which Ulysses' fixed shapes need
    for an epoch's short last micro-batch) with padding that carries no label; labels are shifted on the whole row
    first. A padded batch's `attention_mask` is dropped: its padding is at the end, so causal attention over the
    row (positions 0..T-1) gives its real tokens exactly what they saw before.
    """
    import torch
    import torch.nn.functional as F

    ids, labels = batch["input_ids"], batch["labels"]  # [B, T]
    if "position_ids" in batch:
        positions = batch["position_ids"]  # [B, T]
    else:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # [B, T]
    if ids.shape[0] > rows:
        raise ValueError(f"micro-batch has {ids.shape[0]} rows, more than the {rows} sequence parallelism expects")
    pad_tokens = -ids.shape[1] % sp_size
    if pad_tokens:  # a padding segment restarting at position 0, like collate's
        ids = F.pad(ids, (0, pad_tokens), value=pad_token_id)
        labels = F.pad(labels, (0, pad_tokens), value=IGNORE_INDEX)
        positions = torch.cat([positions, _arange_rows(ids.shape[0], pad_tokens, ids.device)], dim=1)
    pad_rows = rows - ids.shape[0]
    if pad_rows:  # whole rows of padding
        ids = F.pad(ids, (0, 0, 0, pad_rows), value=pad_token_id)
        labels = F.pad(labels, (0, 0, 0, pad_rows), value=IGNORE_INDEX)
        positions = torch.cat([positions, _arange_rows(pad_rows, ids.shape[1], ids.device)])
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T]: token t predicts t + 1
    width = ids.shape[1] // sp_size
    cut = slice(sp_rank * width, (sp_rank + 1) * width)
    return {"input_ids": ids[:, cut].contiguous(), "position_ids": positions[:, cut].contiguous(),
            "shift_labels": shift_labels[:, cut].contiguous()}


def _arange_rows(rows: int, length: int, device):
    import torch

    return torch.arange(length, device=device).expand(rows, length)  # [rows, length]
