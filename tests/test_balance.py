"""Load balancing (paper Sec. 2.1.2): the bias update, the sequence-wise and batch-wise losses against hand
computations, MaxVio, groups per token, and optional capacity dropping."""

import math

import pytest
import torch

from dsv3 import DeepSeekV3
from dsv3 import balance as bal
from dsv3.layers.moe import Routing, capacity_keep
from helpers import random_model, small_config


def test_bias_update_direction_and_magnitude():
    bias = torch.tensor([0.5, 0.0, -0.2, 0.1])
    loads = torch.tensor([8, 2, 5, 5])  # mean 5: overloaded, underloaded, balanced, balanced
    step = bal.bias_update(bias, loads, gamma=0.01)
    assert torch.equal(step, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert torch.allclose(bias, torch.tensor([0.49, 0.01, -0.2, 0.1]))
    bal.bias_update(bias, torch.tensor([0, 0, 9, 11]), gamma=0.5)  # mean 5
    assert torch.allclose(bias, torch.tensor([0.99, 0.51, -0.7, -0.4]))
    bal.bias_update(bias, torch.tensor([3, 3, 3, 3]), gamma=1.0)  # perfectly balanced: nothing moves
    assert torch.allclose(bias, torch.tensor([0.99, 0.51, -0.7, -0.4]))
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        bal.bias_update(bias, loads, gamma=-0.001)
    with pytest.raises(ValueError, match="shape"):
        bal.bias_update(bias, torch.tensor([1, 2, 3]), gamma=0.1)


def test_update_biases_walks_every_moe_layer():
    cfg = small_config(num_nextn_predict_layers=1)
    model = random_model(cfg, bias_scale=0.0)
    layers = model.moe_layers()
    assert len(layers) == cfg.num_moe_layers + 1  # main MoE blocks + the MTP module
    loads = torch.arange(len(layers) * cfg.n_routed_experts).view(len(layers), -1)  # increasing in every row
    bal.update_biases(layers, loads, gamma=0.25)
    half = cfg.n_routed_experts // 2
    for layer in layers:
        b = layer.gate.e_score_correction_bias
        assert b.dtype == torch.float32
        assert torch.equal(b[:half], torch.full((half,), 0.25)) and torch.equal(b[half:], torch.full((half,), -0.25))
    with pytest.raises(ValueError, match="MoE layers"):
        bal.update_biases(layers[:1], loads, gamma=0.1)


def test_bias_changes_selection_not_gating_weights_and_gets_no_gradient():
    cfg = small_config()
    model = random_model(cfg, bias_scale=0.0)
    moe = model.moe_layers()[0]
    x = torch.randn(2, 10, cfg.hidden_size, requires_grad=True)
    _, r0 = moe(x)
    favourite = int(r0.counts.argmax())
    with torch.no_grad():
        moe.gate.e_score_correction_bias[favourite] = -5.0  # as if it had been overloaded for 5000 steps at 0.001
    y, r1 = moe(x)
    assert r1.counts[favourite] == 0 and r0.counts[favourite] > 0
    assert torch.equal(r1.scores, r0.scores)  # affinities do not see the bias
    expect = r1.scores.gather(1, r1.topk_ids)
    expect = expect / expect.sum(-1, keepdim=True) * cfg.routed_scaling_factor  # raw affinities of the chosen
    assert torch.allclose(r1.topk_weights, expect, atol=1e-6)
    y.sum().backward()
    names = [n for n, _ in moe.named_parameters()]
    assert not any("e_score_correction_bias" in n for n in names)
    assert moe.gate.e_score_correction_bias.grad is None and moe.gate.weight.grad is not None


def _routing(scores, ids, B, T):
    E = scores.shape[1]
    return Routing(ids, torch.ones(ids.shape), scores, torch.bincount(ids.reshape(-1), minlength=E), (B, T))


def test_sequence_balance_loss_against_hand_computation():
    torch.manual_seed(0)
    B, T, E, K, alpha = 2, 3, 4, 2, 0.1
    scores = torch.rand(B * T, E)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 2], [3, 1], [3, 2]])  # sequence 0 loves expert 0, seq 1 expert 3
    r = _routing(scores, ids, B, T)
    # Eq. 17-20 written out with plain Python loops, one sequence at a time
    per_seq = []
    for b in range(B):
        total = 0.0
        for i in range(E):
            f = E / (K * T) * sum(1.0 for t in range(T) if i in ids[b * T + t].tolist())
            P = sum(float(scores[b * T + t, i] / scores[b * T + t].sum()) for t in range(T)) / T
            total += f * P
        per_seq.append(total)
    hand = alpha * sum(per_seq) / B
    assert math.isclose(bal.sequence_balance_loss([r], alpha).item(), hand, rel_tol=1e-6)
    assert math.isclose(bal.sequence_balance_loss([r, r], alpha).item(), 2 * hand, rel_tol=1e-6)  # summed over layers
    # batch-wise: f and P over all B*T tokens at once -- the two sequences' imbalances partly cancel
    f_all = [E / (K * B * T) * sum(1.0 for n in range(B * T) if i in ids[n].tolist()) for i in range(E)]
    P_all = [sum(float(scores[n, i] / scores[n].sum()) for n in range(B * T)) / (B * T) for i in range(E)]
    hand_batch = alpha * sum(f * p for f, p in zip(f_all, P_all))
    assert math.isclose(bal.batch_aux_loss([r], alpha).item(), hand_batch, rel_tol=1e-6)
    assert bal.batch_aux_loss([r], alpha).item() < bal.sequence_balance_loss([r], alpha).item()


def test_balance_loss_gradient_reaches_affinities_only():
    torch.manual_seed(1)
    logits = torch.randn(8, 4, requires_grad=True)
    ids = logits.detach().topk(2, dim=-1).indices
    r = _routing(logits.sigmoid(), ids, 2, 4)
    bal.balance_loss([r], "bias", seq_aux_alpha=1.0).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    for mode in ("none", "aux"):
        assert bal.balance_loss([r], mode, aux_alpha=0.0).item() == 0.0
    with pytest.raises(ValueError, match="balance must be one of"):
        bal.balance_loss([r], "switch")


def test_uniform_routing_gives_loss_alpha():
    """Perfect balance: f_i = 1 and P_i = 1/N_r, so sum_i f_i P_i = 1 and the loss equals alpha."""
    E, T = 4, 4  # 2 experts per token
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    r = _routing(torch.full((T, E), 0.5), ids, 1, T)
    assert math.isclose(bal.sequence_balance_loss([r], 0.3).item(), 0.3, rel_tol=1e-6)


def test_max_vio_and_groups_per_token():
    loads = torch.tensor([[4, 4, 4, 4], [8, 0, 4, 4], [0, 0, 0, 0], [16, 0, 0, 0]])
    assert torch.allclose(bal.max_vio(loads), torch.tensor([0.0, 1.0, 0.0, 3.0]))
    ids = torch.tensor([[0, 1, 2], [0, 4, 7], [6, 7, 5], [3, 2, 1]])  # 8 experts in 4 groups of 2
    assert bal.groups_per_token(ids, n_group=4, n_experts=8).tolist() == [2, 3, 2, 2]


def test_group_limited_routing_touches_at_most_topk_group_groups():
    cfg = small_config()
    model = random_model(cfg)
    out = model(torch.randint(0, cfg.vocab_size, (2, 24)))
    m = bal.routing_metrics(out.routing, cfg.n_group)
    assert all(1.0 <= g <= cfg.topk_group for g in m["groups_per_token"])
    assert m["loads"] == out.expert_counts.tolist() and m["dropped"] == [0.0] * len(out.routing)


def test_capacity_dropping_is_off_by_default_and_reports_a_fraction():
    cfg = small_config()
    model = random_model(cfg)
    moe = model.moe_layers()[0]
    x = torch.randn(3, 20, cfg.hidden_size)
    assert moe.capacity_factor is None
    y0, r0 = moe(x)
    assert r0.dropped == 0.0
    N, K, E = 60, cfg.num_experts_per_tok, cfg.n_routed_experts
    moe.set_capacity(float(E) / K)  # room for every token at every expert: nothing may drop
    y1, r1 = moe(x)
    assert r1.dropped == 0.0 and torch.equal(y1, y0)
    moe.set_capacity(0.5)
    y2, r2 = moe(x)
    capacity = math.ceil(0.5 * N * K / E)
    kept = r2.topk_weights != 0  # dropped pairs have their gating weight zeroed
    per_expert = torch.bincount(r2.topk_ids[kept], minlength=E)
    assert (per_expert <= capacity).all()
    assert math.isclose(r2.dropped, 1 - kept.float().mean().item(), abs_tol=1e-6)
    assert r2.dropped >= 1 - E * capacity / (N * K) - 1e-6  # at most E * capacity of the N * K pairs fit
    assert torch.equal(r2.counts, r0.counts)  # loads count the routing decisions, before dropping
    assert not torch.allclose(y2, y0)


def test_capacity_is_a_model_option_checked_when_set():
    cfg = small_config()
    torch.manual_seed(0)
    model = DeepSeekV3(cfg, capacity_factor=0.5, capacity_priority="weight")
    assert all((m.capacity_factor, m.capacity_priority) == (0.5, "weight") for m in model.moe_layers())
    with model.capacity(None):
        assert all(m.capacity_factor is None for m in model.moe_layers())
    assert all((m.capacity_factor, m.capacity_priority) == (0.5, "weight") for m in model.moe_layers())
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        model.set_capacity(0.0)
    with pytest.raises(ValueError, match="capacity priority must be one of"):
        DeepSeekV3(cfg, capacity_factor=1.0, capacity_priority="random")
    with pytest.raises(AttributeError):
        model.moe_layers()[0].capacity_factor = 1.0  # a setting goes through set_capacity, which checks it


def test_capacity_priority_order_and_weight():
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])  # expert 0 gets 4 pairs, expert 1 gets 4; capacity 2 each
    weights = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])
    keep = capacity_keep(ids, weights, n_experts=2, capacity_factor=0.5, priority="order")
    # GShard order: all first choices (slot 0) in token order before any second choice
    # expert 0's queue: t0, t1, t3 (slot 0), t2 (slot 1); expert 1's: t2 (slot 0), t0, t1, t3 (slot 1)
    assert keep.tolist() == [[True, True], [True, False], [True, False], [False, False]]
    keep = capacity_keep(ids, weights, n_experts=2, capacity_factor=0.5, priority="weight")
    # the largest gating weights: expert 0 keeps 0.7 (token 2) and 0.4 (token 3); expert 1 keeps 0.9 and 0.8
    assert keep.tolist() == [[False, True], [False, True], [False, True], [True, False]]
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        capacity_keep(ids, weights, 2, 0.0)
