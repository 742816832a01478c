"""Chapter 7's cost models and figures (dsv3.viz.roofline, fp8, layouts, kernels) against dsv3's own
computations: the cache bytes of dsv3.kv_cache_bytes, real tensors' sizes, the fused MoE kernel's moe_align,
dsv3.kernels.fp8, and a random-routing simulation."""

import math

import pytest
import torch

from dsv3 import ModelConfig, kv_cache_bytes
from dsv3 import kernels as K
from dsv3.kernels import fp8
from dsv3.timing import median_time
from dsv3.viz import fp8 as vf
from dsv3.viz import kernels as kv
from dsv3.viz import layouts as vl
from dsv3.viz import roofline as vr

V3 = ModelConfig.deepseek_v3()


def test_device_ridges_and_validation():
    assert round(vr.H200_DATASHEET.ridge()) == 206
    assert round(vr.H200_MEASURED.ridge()) == 184
    assert round(vr.H800_DATASHEET.ridge()) == 295
    assert vr.H200_DATASHEET.ridge("fp8") == pytest.approx(2 * vr.H200_DATASHEET.ridge(), rel=1e-3)
    with pytest.raises(ValueError, match="precision"):
        vr.H200_DATASHEET.peak("fp16")


def test_mla_decode_cost_is_flashmla_convention_and_matches_the_cache():
    B, L, H, r, dr = 3, 1000, 128, 512, 64
    c = vr.mla_decode_cost(V3, B, L)
    assert c.flops == 2 * B * 1 * H * L * (r + dr + r)
    assert c.bytes == (B * L * (r + dr) + B * 1 * H * (r + dr + r)) * 2
    # the cache part, over all layers, is exactly what dsv3.kv_cache_bytes says a sequence holds
    cache = (c.bytes - B * H * (2 * r + dr) * 2) * V3.num_hidden_layers
    assert cache == kv_cache_bytes(V3, L, batch=B)
    # intensity: ~ Tq H (2r + dr) / (r + dr) for long caches, whatever the batch
    long = [vr.mla_decode_cost(V3, b, 1 << 20, q_len=tq) for b in (1, 64) for tq in (1, 2)]
    for cost, tq in zip(long, (1, 2, 1, 2)):
        assert cost.intensity == pytest.approx(tq * H * (2 * r + dr) / (r + dr), rel=1e-3)
    assert vr.naive_decode_cost(V3, 4, 1 << 20).intensity == pytest.approx(1.0, rel=1e-3)


def test_elementwise_costs_count_the_tensors_they_touch():
    N, D = 5, V3.hidden_size
    x = torch.empty(N, D, dtype=torch.bfloat16)
    per_pass = x.numel() * x.element_size()
    assert vr.rms_norm_cost(V3, N).bytes == 4 * per_pass + D * 2
    assert vr.rms_norm_cost(V3, N, residual=False).bytes == 2 * per_pass + D * 2
    q, s = fp8.act_quant_torch(x.float())
    assert vr.act_quant_cost(N, D).bytes == per_pass + q.numel() * q.element_size() + s.numel() * s.element_size()
    w, ws = fp8.weight_quant(torch.randn(300, 200))
    assert vr.weight_dequant_cost(300, 200).bytes == 300 * 200 * 3 + ws.numel() * 4


def test_active_experts_matches_random_routing():
    torch.manual_seed(0)
    E, k, N = 256, 8, 20
    trials = [torch.stack([torch.randperm(E)[:k] for _ in range(N)]).unique().numel() for _ in range(200)]
    assert sum(trials) / len(trials) == pytest.approx(vr.active_experts(E, k, N), rel=0.02)


def test_moe_intensity_is_tokens_per_expert_and_the_crossover():
    n = 4096  # every expert active; the tokens' own bytes are < 1% of the weights'
    per_expert = n * V3.num_experts_per_tok / V3.n_routed_experts
    assert vr.moe_cost(V3, n).intensity == pytest.approx(per_expert, rel=0.01)
    assert vr.moe_cost(V3, n, weight_bytes=1).intensity == pytest.approx(2 * per_expert, rel=0.02)
    for dev in vr.DEVICES:
        n = vr.compute_bound_tokens(V3, dev)
        assert vr.moe_cost(V3, n).intensity >= dev.ridge() > vr.moe_cost(V3, n - 1).intensity
        assert vr.moe_cost(V3, n).bound(dev) == "compute" and vr.moe_cost(V3, n - 1).bound(dev) == "memory"


def test_kernel_costs_table_and_roofline_time():
    costs = vr.kernel_costs(V3, tokens=64)
    assert len({c.op for c in costs}) == len(costs)
    table = vr.cost_table(costs).splitlines()
    assert len(table) == 2 + len(costs)
    dev = vr.H200_MEASURED
    for c in costs:
        assert c.time(dev) == pytest.approx(max(c.bytes / dev.bandwidth, c.flops / dev.peak(c.precision)))
        assert c.attainable(dev) == pytest.approx(min(dev.peak(c.precision), c.intensity * dev.bandwidth))


def test_roofline_figure_frames_move_moe_not_mla():
    batches = (1, 64, 4096)
    fig = vr.roofline_figure(V3, batches=batches, start=64)
    assert len(fig.frames) == len(batches) and len(fig.layout.sliders[0].steps) == len(batches)
    names = [t.name for t in fig.data]
    i_moe, i_mla = names.index("MoE experts"), names.index("MLA decode (h=128)")
    moe_x, mla_x = [], []
    for frame in fig.frames:
        pts = dict(zip(frame.traces, frame.data))
        moe_x.append(pts[i_moe].x[0])
        mla_x.append(pts[i_mla].x[0])
        for i, trace in pts.items():  # every point sits on the measured roof of its precision
            peak = vr.H200_MEASURED.fp8 if names[i].startswith("FP8") else vr.H200_MEASURED.bf16
            assert trace.y[0] == pytest.approx(min(peak, trace.x[0] * vr.H200_MEASURED.bandwidth) / 1e12, rel=1e-4)
    assert moe_x == sorted(moe_x) and moe_x[-1] > 50 * moe_x[0]
    assert max(mla_x) / min(mla_x) < 1.1
    assert fig.data[i_moe].x[0] == pytest.approx(vr.moe_cost(V3, 64).intensity, rel=1e-5)
    with pytest.raises(ValueError, match="start batch"):
        vr.roofline_figure(V3, batches=batches, start=2)
    lines = {t.name: t for t in vr.intensity_figure(V3).data}
    assert len(lines) == 10 and lines["MoE experts (bf16)"].y[-1] > 1000 > lines["MLA decode, 128 heads"].y[0] > 200
    for dev in vr.DEVICES:
        assert lines[f"ridge: {dev.name} ({dev.ridge():.0f})"].y[0] == dev.ridge()


BENCH = """# dsv3 kernel benchmark: NVIDIA H200

Measured in this run: copy bandwidth 4300 GB/s (read + write), bfloat16 matmul 790 TFLOP/s. torch 2.9.

| op | shape | baseline | baseline time | triton time | speedup | GB/s | TFLOP/s | roofline | max rel err | target |
|---|---|---|---|---|---|---|---|---|---|---|
| rms_norm | 16384x7168 | torch ref | 250.0 us | 120.5 us | 2.07x | 3900 | 0.0 | 91% | 1.0e-03 | PASS (>= 80% copy bw) |
| mla_decode (paged 64) | b=128 sk~4096 h=128 s_q=1 | torch ref | 12.00 ms | 180.0 us | 66.67x | 3100 | 700.0 | 89% | 2.0e-03 | PASS (>= 3.0 TB/s) |
"""  # noqa: E501 (a table as bench_kernels.py writes it)


def test_parse_and_load_bench_tables(tmp_path):
    res = vr.parse_bench_table(BENCH, source="x.txt")
    assert res.device == "NVIDIA H200" and res.bandwidth == 4.3e12 and res.peak == 790e12
    assert [r["op"] for r in res.rows] == ["rms_norm", "mla_decode (paged 64)"]
    assert res.rows[1]["t_baseline"] == pytest.approx(12e-3) and res.rows[0]["t_triton"] == pytest.approx(120.5e-6)
    ((label, intensity, rate),) = res.points()  # the norm row has no FLOP rate
    assert label.startswith("mla_decode") and intensity == pytest.approx(700e12 / 3100e9) and rate == 700e12
    assert vr.load_bench_results(tmp_path) == [] and vr.load_bench_results(tmp_path / "missing") == []
    (tmp_path / "bench_kernels_h200.txt").write_text(BENCH)
    (loaded,) = vr.load_bench_results(tmp_path)
    assert loaded.source == "bench_kernels_h200.txt" and len(loaded.rows) == 2
    fig = vr.roofline_figure(V3, measured=loaded)
    assert fig.data[-1].name == "measured (benchmark)" and fig.data[-1].x[0] == pytest.approx(intensity)
    smoke = BENCH.replace("NVIDIA H200", "CPU (Triton interpreter)")
    (tmp_path / "bench_kernels_smoke.txt").write_text(smoke)
    assert [r.source for r in vr.load_bench_results(tmp_path)] == ["bench_kernels_h200.txt"]
    assert len(vr.load_bench_results(tmp_path, gpu_only=False)) == 2
    (tmp_path / "bench_kernels_bad.txt").write_text("# something else\n")
    with pytest.raises(ValueError, match="bench_kernels_bad.txt"):
        vr.load_bench_results(tmp_path)


def test_moe_layout_is_the_kernels_padded_sorted_rows():
    torch.manual_seed(0)
    E, k, N, bm = 6, 2, 11, 4
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    lay = vl.moe_layout(ids, E, bm)
    pairs = [p for b in lay["blocks"] for p in b["pairs"] if p is not None]
    assert sorted(pairs) == [(t, s) for t in range(N) for s in range(k)]  # every pair exactly once
    for b in lay["blocks"]:
        assert all(ids[t, s].item() == b["expert"] for t, s in (p for p in b["pairs"] if p))
    counts = torch.bincount(ids.flatten(), minlength=E).tolist()
    assert len(lay["blocks"]) == sum(math.ceil(c / bm) for c in counts)
    fig = vl.moe_layout_figure(ids, E, bm)
    assert (
        len(fig.data[0].z) == len(lay["blocks"])
        and sum(row.count("pad") for row in fig.data[0].text) == len(lay["blocks"]) * bm - N * k
    )


@pytest.mark.parametrize("seq_len,splits,block_n", [(300, 3, 32), (70, 4, 16), (5, 3, 32), (64, 1, 64)])
def test_split_ranges_partition_the_sequence(seq_len, splits, block_n):
    ranges = vl.split_ranges(seq_len, splits, block_n)
    assert len(ranges) == splits and ranges[0][0] == 0
    covered = [p for a, z in ranges for p in range(a, z)]
    assert covered == list(range(seq_len))
    assert all(a % block_n == 0 for a, z in ranges if a < z)


def test_paged_cache_figure_covers_each_sequence():
    lens = [300, 70, 190]
    fig = vl.paged_cache_figure(lens, page=64, num_splits=3, block_n=32)
    for b, L in enumerate(lens):
        bars = [t for t in fig.data if t.y[0].startswith(f"seq {b} ")]
        assert sum(t.x[0] for t in bars) == L
    labels = [t.text[0] for t in fig.data if t.text[0]]
    assert len(labels) == len(set(labels)) == sum(-(-L // 64) for L in lens)  # one distinct pool block per page


def test_fp8_weight_errors_and_scale_grid():
    w = vf.fp8_example_weight(300, 260)
    errs = vf.weight_errors(w)
    assert errs["bf16"].max() <= 2**-8  # bf16 keeps 8 significant bits
    assert errs["fp8, 128x128 blocks"].median() < 2**-3
    assert (errs["fp8, 128x128 blocks"] >= 1).sum() < (errs["fp8, one scale per tensor"] >= 1).sum()
    fig = vf.fp8_scale_figure(w)
    _, s = fp8.weight_quant(w)
    assert torch.allclose(torch.tensor(fig.data[0].z), torch.log10(s), rtol=1e-3)
    hist = vf.error_histogram_figure(errs)
    for trace in hist.data:
        assert sum(trace.y) == pytest.approx(100, abs=0.01)


def test_act_errors_use_dsv3_act_quant():
    x = vf.fp8_example_activation(512)
    errs = vf.act_errors(x)
    _, s = fp8.act_quant_torch(x[None])
    assert torch.equal(errs["tile scales"], s[0])
    assert errs["row scale"].item() == pytest.approx(x.abs().max().item() / 448)
    assert (errs["1x128 tiles"] > 0.1).sum() < (errs["one scale per row"] > 0.1).sum()
    fig = vf.act_tiles_figure(x)
    assert len(fig.data) == 6 and len(fig.data[1].y) == 512 // 128 + 1


def test_gemm_errors():
    g = vf.gemm_errors(m=8, n=64, k=256)
    assert g["fp8_gemm vs its reference"] == 0.0  # auto on CPU: the dispatcher ran the reference itself
    assert g["bf16 matmul"] < g["fp8_gemm"] < 0.1


def test_max_abs_diff():
    a = torch.zeros(2, 3)
    assert kv.max_abs_diff((a, a + 1), (a, a)) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        kv.max_abs_diff(a, torch.zeros(3, 2))
    assert kv.max_rel_diff(a + 1, a + 4) == 0.75 and kv.max_rel_diff(a + 0.5, a) == 0.5


@pytest.mark.skipif(not (K.triton_available() and K.interpret_mode()), reason="needs TRITON_INTERPRET=1 and triton")
def test_timing_cases_agree_and_time():
    for name, _shape, torch_fn, triton_fn in kv.timing_cases("cpu", big=False):
        ref, out = torch_fn(), triton_fn()
        first = lambda o: o[0] if isinstance(o, tuple) else o
        assert kv.max_abs_diff(first(out), first(ref)) < 1e-4, name
    assert median_time(lambda: None, reps=3, warmup=1) >= 0
