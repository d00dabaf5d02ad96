"""Many LoRA adapters over one base model, applied per row of a batch (as S-LoRA and vLLM's multi-LoRA do).

    adapters = [load_adapter("support", "out/support-lora", model), ...]   # ds_vicuna.model.adapters
    routing = install_adapters(model, adapters)    # the base's targeted Linears become MultiLoraLinear
    routing.set_rows([0, 2, 1, 0])                 # before each forward: row i uses adapter index [i] (0: none)

Each targeted `nn.Linear` keeps its base weight and gains two stacks for all adapters, stored transposed for
the matmuls: A^T [N+1, in, R] and B^T [N+1, R, out] (slot 0 is zeros, the base; R the largest rank, smaller ranks
zero-padded; B already multiplied by the adapter's alpha/r). A forward gathers each row's A^T and B^T by its index
and adds (x A_row^T) B_row^T with two batched matmuls, so requests for different adapters and for the base run in
one batch. A batch whose rows all use one adapter (or none) takes plain matmuls. Greedy output equals the merged
model's (`merge_into`) up to float rounding: the merged weight is W + s B A, here W x + s B (A x).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ds_vicuna.model.adapters import Adapter


class AdapterRouting:
    """Which adapter each row of the next forward uses; shared by every MultiLoraLinear of one model.

    Attributes:
        names: model names, index 0 the base's ("" here; the worker knows the base's name).
    """

    def __init__(self, names: Sequence[str], device):
        self.names = ["", *names]
        self.device = device
        self.rows: torch.Tensor | None = None  # [B] adapter index per row
        self.single: int | None = 0  # the one index every row uses, or None for a mixed batch

    def index(self, name: str | None) -> int:
        """The adapter index of a model name (None or "" is the base)."""
        return self.names.index(name) if name else 0

    def set_rows(self, indices: Sequence[int]) -> None:
        """Set the adapter of each row of the next forward (in the batch's row order)."""
        distinct = set(indices)
        self.single = next(iter(distinct)) if len(distinct) == 1 else None
        self.rows = None if self.single is not None else torch.tensor(list(indices), dtype=torch.long,
                                                                        device=self.device)


class MultiLoraLinear(nn.Module):
    """A frozen Linear plus every adapter's low-rank update, chosen per row by `routing` (module docstring)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, routing: AdapterRouting):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", a, persistent=False)  # [N+1, in, R]: A transposed
        self.register_buffer("lora_b", b, persistent=False)  # [N+1, R, out]: B transposed, alpha/r folded in
        self.routing = routing

    @property
    def weight(self):  # what code reading `layer.weight` (dtype, device) expects of a Linear
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, in]
        y = self.base(x)  # [B, T, out]
        single = self.routing.single
        if single == 0:
            return y
        if single is not None:
            return y + (x @ self.lora_a[single]) @ self.lora_b[single]
        rows = self.routing.rows  # [B]
        a = self.lora_a.index_select(0, rows)  # [B, in, R]
        b = self.lora_b.index_select(0, rows)  # [B, R, out]
        return y + torch.bmm(torch.bmm(x, a), b)  # [B, T, out]


def install_adapters(model, adapters: Sequence[Adapter]) -> AdapterRouting:
    """Replace each Linear of `model` that some adapter targets by a MultiLoraLinear holding all of them.

    The adapters must have been checked against this model (`ds_vicuna.model.adapters.load_adapter`).

    Returns:
        The routing object the engine sets before each forward (adapter i is index i + 1).
    """
    device = model.get_input_embeddings().weight.device
    routing = AdapterRouting([a.name for a in adapters], device)
    modules = dict(model.named_modules())
    targets = sorted({name for adapter in adapters for name in adapter.weights})
    rank = max((adapter.r for adapter in adapters), default=1)
    for name in targets:
        base = modules[name]
        dtype, where = base.weight.dtype, base.weight.device
        a = torch.zeros(len(adapters) + 1, base.in_features, rank, dtype=dtype, device=where)  # [N+1, in, R]
        b = torch.zeros(len(adapters) + 1, rank, base.out_features, dtype=dtype, device=where)  # [N+1, R, out]
        for i, adapter in enumerate(adapters, start=1):
            if name in adapter.weights:
                lora_a, lora_b = adapter.weights[name]  # [r, in], [out, r]
                a[i, :, :adapter.r] = lora_a.t().to(dtype)
                b[i, :adapter.r] = (lora_b.float() * adapter.scaling).t().to(dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, MultiLoraLinear(base, a, b, routing))
    return routing


def load_adapter_models(base, specs: Sequence[tuple[str, str]]) -> tuple[list, AdapterRouting | None]:
    """Load `--adapter NAME=PATH` folders onto a loaded base `ChatModel` and install them for per-row serving.

    Each adapter becomes its own `ChatModel` sharing the base's weights, with the template, stop strings and
    tokenizer of its folder (its `ds_vicuna.json`; the base's template when it has none).

    Returns:
        (one ChatModel per adapter, the routing the engine sets per batch); ([], None) without adapters.

    Raises:
        AdapterError: a folder that cannot run on this base, or a name used twice / equal to the base's.
    """
    from ds_vicuna.model.adapters import AdapterError, adapter_chat_model, load_adapter

    if not specs:
        return [], None
    names = [name for name, _ in specs]
    clash = sorted({n for n in names if names.count(n) > 1 or n == base.name})
    if clash:
        raise AdapterError(f"--adapter: the name {clash[0]!r} is used twice (the base is served as {base.name!r})")
    adapters = [load_adapter(name, path, base.model) for name, path in specs]
    chats = [adapter_chat_model(base, adapter) for adapter in adapters]
    return chats, install_adapters(base.model, adapters)
