"""Chapter 4's figures and helpers (dsv3.viz.balance) on synthetic histories and tiny random models."""

from __future__ import annotations

import pytest
import torch

from dsv3 import balance as bal
from dsv3.layers.moe import Routing, capacity_keep
from dsv3.viz import balance as vb
from helpers import random_model, small_config


def _history(steps: int = 6, E: int = 4, layers: int = 1, gamma: float = 0.1) -> list[dict]:
    """A synthetic training history whose biases follow the bias rule on made-up loads."""
    g = torch.Generator().manual_seed(0)
    bias = torch.zeros(layers, E)
    out = []
    for s in range(1, steps + 1):
        loads = torch.randint(0, 20, (layers, E), generator=g)
        for b, load in zip(bias, loads):
            bal.bias_update(b, load, gamma)
        out.append(
            {"step": s, "loads": loads.tolist(), "biases": bias.tolist(), "max_vio": float(bal.max_vio(loads).mean())}
        )
    return out


def _routing(scores: torch.Tensor, ids: torch.Tensor, B: int, T: int) -> Routing:
    return Routing(
        ids, torch.ones(ids.shape), scores, torch.bincount(ids.reshape(-1), minlength=scores.shape[1]), (B, T)
    )


def test_paper_bias_steps_from_the_batch_schedule():
    steps = vb.paper_bias_steps()
    # at least the steps at the final batch size, at most all 14.3T tokens at the smallest one
    assert (14.3e12 - 469e9) / (15360 * 4096) < steps < 14.3e12 / (15360 * 4096) + 469e9 / (3072 * 4096)
    assert steps == 234_835
    table = vb.hyperparameter_table(gamma=0.01, seq_alpha=1e-4, aux_alpha=0.01, steps=60)
    assert "| bias update speed γ | 0.001 | 0.01 |" in table
    assert "| sequence-wise loss α (Eq. 17) | 0.0001 | 0.0001 |" in table
    assert "≈ 234,835" in table and "| 0.6 |" in table


def test_moving_average():
    assert vb.moving_average([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
    assert vb.moving_average([3.0], 5) == [3.0]


def test_max_vio_figure_and_load_heatmap():
    h = _history()
    fig = vb.max_vio_figure({"bias": h, "none": h}, ceiling=3.0, smooth=3)
    assert len(fig.data) == 5  # raw + smoothed per run, and the ceiling
    assert fig.data[0].y == tuple(round(e["max_vio"], 4) for e in h)
    assert fig.data[1].y == tuple(round(v, 4) for v in vb.moving_average([e["max_vio"] for e in h], 3))
    assert fig.data[-1].y == (3.0, 3.0)
    share = vb.load_share(h)
    assert torch.allclose(share.sum(-1), torch.ones(len(h), dtype=torch.float64))
    heat = vb.load_heatmap(h)
    z = torch.tensor(heat.data[0].z)  # (E, steps) in %
    assert z.shape == (4, len(h))
    assert torch.allclose(z, (100 * share).t().float(), atol=0.01)


def test_bias_evolution_figure_frames_match_the_history():
    hist = {0.0: _history(gamma=0.0), 0.1: _history(gamma=0.1)}
    fig = vb.bias_evolution_figure(hist, every=2, active=0.1, layer_name="block 1")
    assert "block 1" in fig.layout.title.text
    steps = [f.name for f in fig.frames]
    assert steps == ["step 1", "step 2", "step 4", "step 6"]
    last = fig.frames[-1]
    assert len(last.data) == 4  # (bias, load) per gamma
    assert last.data[2].y == tuple(round(b, 5) for b in hist[0.1][-1]["biases"][0])
    load = torch.tensor(hist[0.1][-1]["loads"][0], dtype=torch.float64)
    assert last.data[3].y == tuple(round(v, 4) for v in (load / load.mean() - 1).tolist())
    assert all(b == 0.0 for b in last.data[0].y)  # gamma 0: the bias never moves
    assert [t.visible for t in fig.data] == [False, False, True, True]
    assert fig.data[2].y == last.data[2].y and fig.layout.sliders[0].active == len(steps) - 1  # opens on the end
    assert list(fig.layout.updatemenus[0].buttons[0].args[0]) == steps  # play replays every frame
    gamma_slider = fig.layout.sliders[1]
    assert [s.label for s in gamma_slider.steps] == ["0", "0.1"]
    assert gamma_slider.steps[0].args[0]["visible"] == [True, True, False, False]


def test_gamma_widget_trains_only_what_is_missing():
    pytest.importorskip("ipywidgets")
    calls = []

    def fake_train(gamma):
        calls.append(gamma)
        return _history(gamma=gamma)

    cache = {0.1: _history(gamma=0.1)}
    box = vb.gamma_widget(fake_train, gammas=[0.0, 0.1], cache=cache, value=0.1, ceiling=3.0)
    assert calls == []  # the initial value came from the cache
    slider, report = box.children
    assert report.value == vb.gamma_report_html(0.1, cache[0.1], 0, 3.0)
    slider.value = 0.0
    assert calls == [0.0] and 0.0 in cache
    assert "γ = 0</b>" in report.value


def test_sparkline_and_report():
    assert vb.sparkline([0, 1, 2], top=2) == "▁▅█"
    assert vb.sparkline([0.0, 0.0]) == "▁▁"
    h = _history(gamma=0.1)
    text = vb.gamma_report_html(0.1, h, ceiling=3.0)
    assert text.count("<tr>") == 1 + 4  # header + one row per expert
    for b in h[-1]["biases"][0]:
        assert f"{b:+.3f}" in text
    assert vb.sparkline([e["max_vio"] for e in h], 3.0) in text


@pytest.mark.slow
def test_balance_gradients_on_a_random_model():
    cfg = small_config(num_nextn_predict_layers=0)
    model = random_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    g = vb.balance_gradients(model, x, x, aux_alpha=0.01, seq_alpha=0.001)
    assert g["main"]["cos_with_main"] == pytest.approx(1.0, abs=1e-5)
    for key in ("aux", "seq"):
        assert g[key]["router_norm"] > 0 and g[key]["other_norm"] > 0  # reaches the rest of the model too
        assert -1.0 <= g[key]["cos_with_main"] <= 1.0
    double = vb.balance_gradients(model, x, x, aux_alpha=0.02, seq_alpha=0.001)
    assert double["aux"]["router_norm"] == pytest.approx(2 * g["aux"]["router_norm"], rel=1e-4)
    assert double["aux"]["cos_with_main"] == pytest.approx(g["aux"]["cos_with_main"], abs=1e-4)
    assert g["losses"]["aux"] == pytest.approx(bal.batch_aux_loss(model(x).routing, 0.01).item(), rel=1e-5)
    assert model.training is False  # restored (random_model returns an eval model)


def test_dropped_fraction_and_capacity_figure():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3]])  # expert 0 gets 4 of 8 pairs, 4 experts
    frac = vb.dropped_fraction(ids, 4, [0.5, 1.0, 2.0])
    # capacity ceil(cf * 8 / 4): 1 -> expert 0 keeps 1, expert 1 keeps 1: kept 1+1+1+1 = 4 of 8
    assert frac[0] == pytest.approx(0.5)
    assert frac[1] == pytest.approx(2 / 8)  # capacity 2: expert 0 drops 2
    assert frac[2] == pytest.approx(0.0)
    keep = capacity_keep(ids, torch.ones(ids.shape), 4, 1.0)
    assert frac[1] == pytest.approx(1 - keep.float().mean().item())
    fig = vb.capacity_figure({"bias": frac}, [0.5, 1.0, 2.0])
    assert fig.data[0].y == (50.0, 25.0, 0.0)


def test_dropped_fraction_matches_the_layers_capacity_switch():
    cfg = small_config()
    model = random_model(cfg)
    moe = model.moe_layers()[0]
    x = torch.randn(2, 16, cfg.hidden_size)
    with torch.no_grad():
        _, r = moe(x)
        with model.capacity(0.75):
            _, r_cap = moe(x)
    assert moe.capacity_factor is None  # the context restored the layer's own setting
    assert r_cap.dropped == pytest.approx(vb.dropped_fraction(r.topk_ids, cfg.n_routed_experts, [0.75])[0], abs=1e-6)


def test_mean_affinity():
    scores = torch.tensor([[0.2, 0.8], [0.4, 0.6]])
    r = _routing(scores, torch.tensor([[1], [1]]), 1, 2)
    assert torch.allclose(vb.mean_affinity(r), torch.tensor([0.3, 0.7]))
