"""dsv3.viz.fp8: the numerics behind the FP8 recipe (scaling granularity, accumulation precision)."""

import pytest
import torch

from dsv3.fp8 import fp8_modules
from dsv3.viz import fp8 as nx
from helpers import random_model, small_config


def test_fine_grained_scaling_beats_per_tensor_with_outliers():
    """e4m3 spans 2^-9 .. 448: an outlier 10^5 times the typical value pushes the typical values of a tensor that
    shares its scale into the subnormals and to zero; 1 x 128 tiles confine that to the outlier's own tiles."""
    torch.manual_seed(0)
    x = nx.inject_outliers(torch.randn(64, 512), n_channels=2, factor=1e5)
    per_tensor, tiles = nx.roundtrip_error(x, None), nx.roundtrip_error(x, nx.ACT_TILE)
    assert per_tensor["underflow"] > 0.3 and tiles["underflow"] < 0.1
    assert tiles["median_rel"] < per_tensor["median_rel"] / 10
    assert tiles["median_rel"] < 2**-4  # within e4m3's half ulp
    clean = torch.randn(64, 512)
    assert nx.roundtrip_error(clean, None)["underflow"] == 0 and nx.roundtrip_error(clean, None)["median_rel"] < 2**-4
    rows = nx.granularity_table({"x": x})
    assert rows[0]["tensor underflow"] == per_tensor["underflow"] and rows[0]["shape"] == (64, 512)


def test_inject_outliers_scales_the_chosen_channels_only():
    x = torch.ones(3, 10)
    y = nx.inject_outliers(x, n_channels=2, factor=7.0, seed=1)
    assert (y == 7.0).sum() == 6 and (y == 1.0).sum() == 24 and torch.equal(x, torch.ones(3, 10))


def test_round_bits():
    v = torch.tensor([1.75, -1.75, 1.0 + 2**-20, 3.0], dtype=torch.float64)
    assert nx.round_bits(v, 2).tolist() == [1.5, -1.5, 1.0, 3.0]  # toward zero
    assert nx.round_bits(v, 2, "nearest").tolist() == [2.0, -2.0, 1.0, 3.0]
    assert torch.equal(nx.round_bits(v, 53), v)


def test_accumulation_promotion_bounds_the_error():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 2048, generator=g).to(torch.float8_e4m3fn).float()
    b = torch.randn(4, 2048, generator=g).to(torch.float8_e4m3fn).float()
    exact = a.double() @ b.double().t()
    assert torch.allclose(nx.accumulate(a, b, None), exact, rtol=1e-12)
    assert torch.allclose(nx.accumulate(a, b, 53), exact, rtol=1e-12)  # 53 bits: float64 itself
    limited = nx.norm_error(nx.accumulate(a, b, 14), exact)
    promoted = nx.norm_error(nx.accumulate(a, b, 14, promote_every=128), exact)
    assert limited > 5 * promoted and promoted < 2e-3
    rows = nx.accumulation_errors(ks=(128, 1024), outputs=2)
    assert [r["K"] for r in rows] == [128, 1024] and rows[1]["limited"] > rows[1]["promoted"]
    assert rows[0]["limited"] == rows[0]["promoted"]  # K = N_C: nothing to promote yet


def test_linear_inputs_and_table():
    model = random_model(small_config(num_hidden_layers=2))
    ids = torch.randint(0, 320, (2, 5))
    acts = nx.linear_inputs(model, ids)
    linears = [n for n, m in fp8_modules(model).items() if isinstance(m, torch.nn.Linear)]
    assert sorted(acts) == sorted(linears)
    assert acts["layers.0.self_attn.q_a_proj"].shape == (10, 64)
    assert acts["layers.0.self_attn.o_proj"].shape == (10, 4 * 16)
    text = nx.format_table([{"K": 128, "err": 0.123456}, {"K": 7168, "err": 1e-5}])
    assert text.splitlines()[0].split() == ["K", "err"] and "0.1235" in text and "1e-05" in text
    with pytest.raises(ValueError):
        nx.roundtrip_error(torch.ones(3), None)


def test_outlier_sweep_and_figures():
    torch.manual_seed(0)
    tensors = {"a": torch.randn(32, 256), "b": torch.randn(16, 384)}
    rows = nx.outlier_sweep(tensors, factors=(1.0, 1e5), n_channels=2)
    assert [r["factor"] for r in rows] == [1.0, 1e5]
    clean = nx.granularity_table(tensors)
    assert rows[0]["tile median_rel"] == sum(r["tile median_rel"] for r in clean) / 2  # factor 1: untouched
    assert rows[1]["tensor underflow"] > 0.3 > rows[1]["tile underflow"]
    fig = nx.granularity_figure(rows)
    assert len(fig.data) == 4 and fig.layout.xaxis.type == "log"
    assert list(fig.data[1].y) == [float(f"{r['tile median_rel']:.4g}") for r in rows]

    acc = [{"K": 128, "limited": 1e-3, "promoted": 1e-3}, {"K": 8192, "limited": 0.1, "promoted": 2e-4}]
    fig = nx.accumulation_figure(acc)
    assert [tr.name for tr in fig.data] == ["14-bit accumulator only", "promoted to fp32 every 128"]
    assert "7,168" in " ".join(a.text for a in fig.layout.annotations)  # 18432 lies outside the K range shown
    assert "18,432" not in " ".join(a.text for a in fig.layout.annotations)

    hist = [{"step": 1, "main_loss": 6.0}, {"step": 2, "main_loss": 5.5, "val_loss": 5.6}]
    fig = nx.loss_curves_figure({"fp32": hist, "FP8": hist})
    assert [tr.name for tr in fig.data] == ["fp32 train", "fp32 validation", "FP8 train", "FP8 validation"]
    assert list(fig.data[1].x) == [2] and list(fig.data[0].y) == [6.0, 5.5]
