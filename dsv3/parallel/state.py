"""Between a distributed run's pieces of the model and the one-process layout its checkpoints use: the gathered
full tensors turned back into a ``DeepSeekV3`` and its AdamW (what ``dsv3.rundir`` writes), and a checkpoint's full
optimizer state handed to the parameters a rank trains (sliced by the strategy when it shards them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..model import DeepSeekV3
from ..train import optimizer_group


def one_process_copy(
    model_config: ModelConfig,
    weights: dict[str, torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    opt_full: dict[str, torch.Tensor],
) -> tuple[DeepSeekV3, torch.optim.Optimizer]:
    """A one-process model holding ``weights`` (the full state dict) and an optimizer of ``optimizer``'s type and
    groups whose state is ``opt_full`` ("<param name>.<key>" full tensors; scalar entries are taken from this rank's
    own state when the full dict does not carry them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    plain = DeepSeekV3(model_config).float()
    plain.load_state_dict(weights)
    params = dict(plain.named_parameters())
    # a parameter this rank does not train (another pipeline stage's) goes where make_optimizer puts it
    where = {names[id(p)]: i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    members = [[] for _ in optimizer.param_groups]
    for n, p in params.items():
        members[where.get(n, optimizer_group(p))].append(p)
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": members[i]}
        for i, g in enumerate(optimizer.param_groups)
    ]
    plain_opt = type(optimizer)(groups)  # every group carries its own hyperparameters
    prefixes = sorted({k.rsplit(".", 1)[0] for k in opt_full})
    local = {names[id(p)]: st for p, st in optimizer.state.items()}
    for n in prefixes:
        entries = {k.rsplit(".", 1)[1]: v for k, v in opt_full.items() if k.rsplit(".", 1)[0] == n}
        for k, v in local.get(n, {}).items():
            if k not in entries:
                entries[k] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
        plain_opt.state[params[n]] = entries
    return plain, plain_opt


def load_optimizer_entries(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict,
    device: torch.device,
    shard: Callable[[str, nn.Parameter, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Give each parameter this rank trains its entries of a checkpoint's full optimizer state
    (``optimizer.<param>.<key>`` tensors); ``shard(name, param, full)`` cuts a full entry to the rank's piece."""
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if id(p) not in trained:
            continue
        prefix = f"optimizer.{name}."
        state = {}
        for k, v in tensors.items():
            if not k.startswith(prefix) or "." in k[len(prefix) :]:
                continue
            if v.dim() > 0:
                v = v.to(device)
                if shard is not None:
                    v = shard(name, p, v)
            state[k[len(prefix) :]] = v
        if state:
            optimizer.state[p] = state
