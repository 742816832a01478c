"""Between a distributed run's pieces of the model and the one-process layout its checkpoints use: the gathered
full tensors turned back into a ``DeepSeekV3`` and its AdamW (what ``dsv3.rundir`` writes), and a checkpoint's full
optimizer state handed to the parameters a rank trains (sliced by the strategy when it shards them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed
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
    by_param: dict[str, dict] = {}  # "<param>.<key>" entries grouped by parameter, in one pass
    for k, v in opt_full.items():
        n, key = k.rsplit(".", 1)
        by_param.setdefault(n, {})[key] = v
    local = {names[id(p)]: st for p, st in optimizer.state.items()}
    for n in sorted(by_param):
        entries = by_param[n]
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
    (``optimizer.<param>.<key>`` tensors, on the host). ``shard(name, param, full)`` cuts a full entry to the rank's
    piece while it is still on the host and places it (on ``device``, as a DTensor, ...); without it entries go to
    ``device`` whole."""
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
                v = shard(name, p, v) if shard is not None else v.to(device)
            state[k[len(prefix) :]] = v
        if state:
            optimizer.state[p] = state


def is_expert_entry(name: str, t: torch.Tensor) -> bool:
    """Whether a state-dict or optimizer entry is a stacked routed-expert tensor (E, ., .), which expert parallelism
    splits along its first dimension (the shared experts are dense)."""
    return ".experts." in name and "shared_experts" not in name and t.dim() == 3


def gather_expert_slices(t: torch.Tensor, group, ep: int) -> torch.Tensor:
    """The whole (E, ., .) tensor from the ep ranks' (E / ep, ., .) slices, in ep-rank order (every ep rank calls
    it; a slice on the meta device, held by another pipeline stage, just takes the whole shape)."""
    if t.is_meta:
        return torch.empty((t.shape[0] * ep, *t.shape[1:]), dtype=t.dtype, device="meta")
    parts = [torch.empty_like(t) for _ in range(ep)]
    torch.distributed.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts)
