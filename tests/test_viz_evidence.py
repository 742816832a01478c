"""The paper's ablation tables as data (dsv3.viz.evidence): shape, sources, and the claims the report makes of them."""

from dsv3.viz import evidence as ev

BENCHMARKS = [
    "Pile-test (BPB)",
    "BBH (EM)",
    "MMLU (EM)",
    "DROP (F1)",
    "TriviaQA (EM)",
    "NaturalQuestions (EM)",
    "HumanEval (Pass@1)",
    "MBPP (Pass@1)",
    "GSM8K (EM)",
    "MATH (EM)",
]


def test_tables_have_the_reports_rows_and_sources():
    for table, ref in ((ev.MTP_ABLATION, "Table 4"), (ev.AUX_FREE_ABLATION, "Table 5")):
        assert ref in table.source
        assert list(table.rows) == BENCHMARKS
        assert all(len(v) == 4 for _, v in table.rows.values())
        assert table.setup["# Training Tokens"][0] == "1.33T"
    assert ev.MTP_ABLATION.setup["# Training Tokens"][2] == "540B"
    assert ev.AUX_FREE_ABLATION.setup["# Training Tokens"][2] == "578B"


def test_spot_values_from_the_report():
    assert ev.MTP_ABLATION.rows["HumanEval (Pass@1)"][1] == (20.7, 26.8, 44.5, 53.7)
    assert ev.MTP_ABLATION.rows["Pile-test (BPB)"][1] == (0.729, 0.729, 0.658, 0.657)
    assert ev.AUX_FREE_ABLATION.rows["GSM8K (EM)"][1] == (27.1, 29.6, 70.7, 74.5)
    assert ev.BALANCE_SCOPE["1B MoE"] == {
        "sequence-wise aux loss": 2.258,
        "auxiliary-loss-free": 2.253,
        "batch-wise aux loss": 2.253,
    }
    assert (
        ev.BALANCE_SCOPE["3B MoE"]["auxiliary-loss-free"] == ev.BALANCE_SCOPE["3B MoE"]["batch-wise aux loss"] == 2.080
    )


def test_the_reports_claims_hold_on_its_own_tables():
    # "consistently enhances the model performance on most of the evaluation benchmarks" (both tables, both scales)
    for table in (ev.MTP_ABLATION, ev.AUX_FREE_ABLATION):
        for scale in ("small", "large"):
            better, equal, worse = table.tally(scale)
            assert better + equal + worse == len(BENCHMARKS) and better > len(BENCHMARKS) / 2
    # lower bits per byte is better: MTP's large-scale Pile-test change counts as an improvement
    assert ev.MTP_ABLATION.changes("large")["Pile-test (BPB)"] > 0
    assert ev.MTP_ABLATION.changes("small")["MMLU (EM)"] == 3.3
    # Sec. 4.5.3: sequence-wise balance is the worst of the three at both sizes
    for losses in ev.BALANCE_SCOPE.values():
        assert losses["sequence-wise aux loss"] > losses["auxiliary-loss-free"] == losses["batch-wise aux loss"]


def test_markdown():
    md = ev.MTP_ABLATION.markdown()
    assert (
        md.count("\n") == 2 + 3 + len(BENCHMARKS) - 1
        and "| HumanEval (Pass@1) | 0-shot | 20.7 | 26.8 | 44.5 | 53.7 |" in md
    )
    assert "2.258" in ev.balance_scope_markdown()


def test_mla_vs_mha_from_the_v2_report():
    t = ev.MLA_VS_MHA
    assert "2405.04434" in t.source and t.setup["KV Cache per Token (# Element)"] == (
        "110.6K",
        "15.6K",
        "860.2K",
        "34.6K",
    )
    assert t.tally("small") == (3, 0, 1) and t.tally("large") == (4, 0, 0)  # "MLA shows better performance than MHA"


def test_training_flops_from_the_tables_setup():
    import pytest

    assert ev.parse_count("1.33T") == 1.33e12 and ev.parse_count("110.6K") == 110600.0
    with pytest.raises(ValueError, match="suffix"):
        ev.parse_count("2.4")
    assert ev.AUX_FREE_ABLATION.training_flops(0) == 6 * 2.4e9 * 1.33e12
    assert ev.MTP_ABLATION.training_flops(2) == 6 * 20.9e9 * 540e9


def test_larger_recipe_is_priced_by_the_package():
    from dsv3 import count_parameters
    from dsv3.accounting import flops_per_token
    from dsv3.viz.roofline import H200_MEASURED

    r = ev.larger_recipe(tokens=1e9, seq_len=1024, batch_size=8, utilization=0.5)
    c = r["config"]
    assert c.num_experts_per_tok % c.topk_group == 0 and c.num_experts_per_tok // c.topk_group == 2  # as V3
    assert 0.8e9 < r["total"] < 1.2e9 and r["total"] == count_parameters(c)["total"]  # the report's 1B scale
    assert r["steps"] == round(1e9 / (8 * 1024))
    per_token = flops_per_token(c, seq_len=1024, training=True)["total"]
    assert r["flops"] == per_token * 1e9
    assert r["h200_days"] == r["flops"] / (H200_MEASURED.bf16 * 0.5) / 86400
    assert ev.larger_recipe(tokens=2e9)["h200_days"] == 2 * ev.larger_recipe(tokens=1e9)["h200_days"]
