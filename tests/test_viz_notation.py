"""The notation table: every symbol maps to a real config field, and the table shows the configs' own values."""

import dataclasses

import pytest

from dsv3.config import ModelConfig
from dsv3.train import TrainConfig
from dsv3.viz import notation


def test_every_symbol_names_an_existing_field_once():
    fields = [s.field for s in notation.NOTATION if s.field]
    assert len(fields) == len(set(fields))
    for field in fields:
        owner, name = field.split(".", 1)
        cls = {"ModelConfig": ModelConfig, "TrainConfig": TrainConfig}[owner]
        assert name in {f.name for f in dataclasses.fields(cls)} or isinstance(getattr(cls, name, None), property), (
            f"{field} is not a field of {owner}"
        )


def test_the_papers_core_symbols_are_there():
    symbols = {s.tex for s in notation.NOTATION}
    assert {
        "d",
        "n_h",
        "d_h",
        "d_c",
        "d_c'",
        "d_h^R",
        "N_s",
        "N_r",
        "K_r",
        "M",
        r"\gamma",
        r"\alpha",
        r"\lambda",
        "D",
    } <= symbols


def test_table_values_come_from_the_configs():
    table = notation.notation_markdown()
    rows = {line.split(" | ")[0].strip("| $"): line for line in table.splitlines()[2:]}
    v3, tiny = ModelConfig.deepseek_v3(), ModelConfig.tiny()
    assert f"| {v3.kv_lora_rank:,} | {tiny.kv_lora_rank:,} |" in rows["d_c"]
    assert f"| {v3.n_routed_experts:,} | {tiny.n_routed_experts:,} |" in rows["N_r"]
    assert f"|  | {TrainConfig().mtp_weight:g} |" in rows[r"\lambda"]
    assert rows["s"].endswith(f"| {v3.rope_scaling['factor']:g} | {tiny.rope_scaling['factor']:g} |")
    assert "| `kv_lora_rank` |" in rows["d_c"] and "| `TrainConfig.mtp_weight` |" in rows[r"\lambda"]
    assert all(line.count("|") == 6 for line in table.splitlines()), "a cell holds a stray '|'"


def test_unknown_owner_is_refused():
    with pytest.raises(ValueError, match="must start with ModelConfig"):
        notation.field_value("Other.x", ModelConfig.tiny(), TrainConfig())
