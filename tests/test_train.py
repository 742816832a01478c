"""The trainer: schedules, MTP alignment through real batches, the bias update inside training, exact resume,
bad input before any compute, the NaN stop, capacity dropping, and the train/sample command line."""

import collections
import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv3 import DeepSeekV3, load_pretrained
from dsv3.cli import main
from dsv3.data import DOMAIN_FILES
from dsv3.data import data_dir as bundled_data_dir
from dsv3.rundir import find_checkpoint
from dsv3.train import (
    TrainConfig,
    TrainingDivergedError,
    bias_update_speed_at,
    init_model,
    lr_at,
    make_data,
    mtp_weight_at,
    train,
)
from helpers import small_config

trainer = importlib.import_module("dsv3.train")  # the module (``dsv3.train`` may name the function)
MODEL = small_config(vocab_size=2048)  # the bundled tokenizer's vocabulary


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small copy of the bundled corpus (the first ~40 KB of each domain) with the real tokenizer."""
    d = tmp_path_factory.mktemp("data")
    src = bundled_data_dir()
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    for name in DOMAIN_FILES.values():
        text = (src / name).read_bytes().decode()
        (d / name).write_bytes(text[: text.index("\n", 40_000) + 1].encode())
    return d


def config(data, out=None, **kw) -> TrainConfig:
    base = dict(
        steps=4,
        batch_size=4,
        seq_len=16,
        warmup_steps=2,
        lr=3e-3,
        eval_every=2,
        eval_batches=2,
        save_every=2,
        data_dir=str(data),
        out_dir=None if out is None else str(out),
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_schedules():
    c = TrainConfig(
        steps=100,
        lr=1e-3,
        warmup_steps=10,
        min_lr_ratio=0.1,
        mtp_weight_switch=0.5,
        bias_update_until=0.9,
        bias_update_speed=0.002,
    )
    assert math.isclose(lr_at(0, c), 1e-4) and math.isclose(lr_at(9, c), 1e-3) and math.isclose(lr_at(10, c), 1e-3)
    assert math.isclose(lr_at(99, c), 1e-4)
    decay = [lr_at(s, c) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert mtp_weight_at(49, c) == 0.3 and mtp_weight_at(50, c) == 0.1
    assert bias_update_speed_at(89, c) == 0.002 and bias_update_speed_at(90, c) == 0.0
    assert bias_update_speed_at(0, c.replace(balance="aux")) == 0.0


def test_mtp_alignment_through_the_trainer(data):
    """Step 1's logged losses equal a hand cross-entropy of the initial model on the first batch, where depth k at
    position i is scored against token i + k + 1 of the raw window."""
    model_config = small_config(vocab_size=2048, num_nextn_predict_layers=2)
    tc = config(data, steps=1, eval_every=0)
    h = train(model_config, tc).history[0]
    model = init_model(model_config, tc.seed)
    _, batches, _ = make_data(tc, model_config)
    b = next(batches)
    window = torch.cat([b.input_ids, b.labels[:, -1:]], dim=1)  # (B, T + 1) the raw token window
    assert torch.equal(b.labels, window[:, 1:])
    with torch.no_grad():
        out = model(b.input_ids, return_mtp=True)
    V = model_config.vocab_size
    main_ce = F.cross_entropy(out.logits.reshape(-1, V), window[:, 1:].reshape(-1)).item()
    depth = [
        F.cross_entropy(lg.reshape(-1, V), window[:, k + 1 :].reshape(-1)).item()
        for k, lg in enumerate(out.mtp_logits, 1)
    ]  # depth k predicts t_{i+k+1}
    shifted_wrong = F.cross_entropy(out.mtp_logits[0].reshape(-1, V), window[:, 1:-1].reshape(-1)).item()
    assert math.isclose(h["main_loss"], main_ce, rel_tol=1e-5)
    assert math.isclose(h["mtp_loss"], sum(depth) / 2, rel_tol=1e-5)
    assert not math.isclose(h["mtp_loss"], (shifted_wrong + depth[1]) / 2, rel_tol=1e-5)  # off by one: differs
    assert math.isclose(h["loss"], main_ce + 0.3 * sum(depth) / 2, rel_tol=1e-5)


@pytest.mark.slow
def test_bias_moves_by_gamma_on_the_whole_step_loads(data):
    tc = config(data, steps=3, grad_accum=2, bias_update_speed=0.05, eval_every=0)
    r = train(MODEL, tc)
    K, n_main = MODEL.num_experts_per_tok, MODEL.num_moe_layers
    prev = torch.zeros(n_main + 1, MODEL.n_routed_experts)
    for h in r.history:
        loads = torch.tensor(h["loads"])  # (L, N_r): main MoE layers, then the MTP module
        assert (loads[:n_main].sum(-1) == tc.batch_size * tc.seq_len * K).all()  # both micro-batches counted
        assert (loads[n_main:].sum(-1) == tc.batch_size * (tc.seq_len - 1) * K).all()
        mean = loads.float().mean(-1, keepdim=True)
        expect = prev + 0.05 * torch.sign(mean - loads)
        assert torch.allclose(torch.tensor(h["biases"]), expect, atol=1e-6)
        assert h["max_vio"] == pytest.approx(float((loads[:n_main].amax(-1) / mean[:n_main, 0] - 1).mean()))
        prev = torch.tensor(h["biases"])
    got = torch.stack([m.gate.e_score_correction_bias for m in r.model.moe_layers()])
    assert torch.equal(got, prev) and prev.abs().sum() > 0
    assert r.moe_layers == ["layers.1", "layers.2", "mtp.0"]
    aux = train(MODEL, tc.replace(balance="aux", steps=1))
    assert all(m.gate.e_score_correction_bias.abs().sum() == 0 for m in aux.model.moe_layers())
    assert aux.history[0]["balance_loss"] > 0


@pytest.mark.slow
def test_exact_resume(data, tmp_path):
    """2N steps in one run == N steps, resume, N steps: weights, router biases, optimizer state, data position and
    history, bit for bit."""
    full = train(MODEL, config(data, tmp_path / "full", steps=6, save_every=3))
    tc = config(data, tmp_path / "split", steps=6, save_every=3)
    first = train(MODEL, tc, callback=lambda entry, model: entry["step"] == 3)
    assert first.stopped_early and len(first.history) == 3
    assert find_checkpoint(tmp_path / "split").name == "checkpoint-000003"
    second = train(MODEL, tc, resume=True)
    a, b = full.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    biases = [m.gate.e_score_correction_bias for m in second.model.moe_layers()]
    assert all(bias.abs().sum() > 0 for bias in biases)  # the biases did move, and were resumed exactly
    assert json.dumps(full.history) == json.dumps(second.history)
    assert [h["step"] for h in second.history] == list(range(1, 7))
    from safetensors.torch import load_file

    ckpt_a, ckpt_b = find_checkpoint(tmp_path / "full"), find_checkpoint(tmp_path / "split")
    ta, tb = load_file(str(ckpt_a / "trainer.safetensors")), load_file(str(ckpt_b / "trainer.safetensors"))
    assert ta.keys() == tb.keys() and any(k.endswith(".exp_avg_sq") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ja, jb = (json.loads((c / "trainer.json").read_text()) for c in (ckpt_a, ckpt_b))
    assert ja["data"] == jb["data"] and ja["data"]["step"] == 6
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["checkpoint-000006", "latest"]
    reloaded = load_pretrained(ckpt_a)  # the released layout, router biases included
    assert torch.equal(reloaded.moe_layers()[0].gate.e_score_correction_bias, biases[0])
    # resuming a finished run trains nothing and returns its state
    again = train(MODEL, tc, resume=True)
    assert len(again.history) == 6 and torch.equal(again.model.lm_head.weight, second.model.lm_head.weight)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(steps=-5), "TrainConfig.steps must be a positive integer"),
        (dict(bias_update_speed=-0.001), "TrainConfig.bias_update_speed must be a finite number >= 0"),
        (dict(balance="switch"), "TrainConfig.balance must be one of"),
        (dict(batch_size=5, grad_accum=2), "batch_size=5 is not divisible by grad_accum=2"),
        (dict(domains=("poetry",)), "unknown domain 'poetry'"),
        (dict(domains={"shakespeare": -1.0}), "weight of 'shakespeare'"),
        (dict(lr=float("nan")), "TrainConfig.lr"),
        (dict(capacity_factor=0.0), "TrainConfig.capacity_factor"),
    ],
)
def test_bad_config_values(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


@pytest.mark.slow
def test_bad_input_fails_before_any_compute(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(MODEL, config(data, run, steps=2, eval_every=0))

    def no_compute(*args, **kwargs):
        raise AssertionError("compute started before the input was checked")

    monkeypatch.setattr(trainer, "init_model", no_compute)
    monkeypatch.setattr(trainer, "load_pretrained", no_compute)
    monkeypatch.setattr(DeepSeekV3, "forward", no_compute)
    with pytest.raises(ValueError, match="seq_len=600 exceeds the model's max_position_embeddings=512"):
        train(MODEL, config(data, seq_len=600))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(data / "tokenizer.json", empty / "tokenizer.json")
    (empty / DOMAIN_FILES["shakespeare"]).write_text("")
    with pytest.raises(ValueError, match="is empty"):
        train(MODEL, config(empty))
    with pytest.raises(ValueError, match="already holds a training run"):
        train(MODEL, config(data, run, steps=4))
    with pytest.raises(ValueError, match="holds another run: its model has hidden_size=64"):
        train(small_config(vocab_size=2048, hidden_size=96), config(data, run, steps=4, eval_every=0), resume=True)
    with pytest.raises(ValueError, match="TrainConfig.lr=0.003, this run asks for lr=0.001"):
        train(MODEL, config(data, run, steps=4, eval_every=0, lr=1e-3), resume=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        train(MODEL, config(data, tmp_path / "fresh"), resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(MODEL, config(data, tmp_path / "file"))


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    def poison(entry, model):
        if entry["step"] == 2:  # after checkpoint 2 is written, a weight turns into NaN
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")

    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"at step 3; the last good checkpoint is .*checkpoint-000002"):
        train(MODEL, config(data, run, steps=6, save_every=2), callback=poison)
    ckpt = find_checkpoint(run)
    assert ckpt.name == "checkpoint-000002"
    model = load_pretrained(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(json.loads((ckpt / "trainer.json").read_text())["history"]) == 2


@pytest.mark.slow
def test_capacity_factor_reports_the_dropped_fraction(data):
    default = train(MODEL, config(data, steps=1, eval_every=0))
    assert "dropped" not in default.history[0]
    dropping = train(MODEL, config(data, steps=1, eval_every=0, capacity_factor=0.5))
    dropped = dropping.history[0]["dropped"]
    assert len(dropped) == 3 and all(0.4 < d < 1 for d in dropped)  # about half of the pairs find no room


def count_host_reads(monkeypatch) -> collections.Counter:
    """Count the tensor-to-Python reads (item, tolist, bool/float/int of a tensor: each a device synchronization on a
    GPU) that code in dsv3/ makes, by the file that makes them."""
    root = Path(trainer.__file__).parent
    counts = collections.Counter()
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename)
            if caller.is_relative_to(root):
                counts[caller.relative_to(root).as_posix()] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_one_host_read_for_the_metrics_of_a_step(data, monkeypatch):
    """A training step reads its metrics back once before the optimizer step and its biases once after it, however
    many micro-batches and MoE layers (before: five reads per micro-batch, one per MoE layer and more); the only
    other reads are the torch experts' split sizes (one per MoE layer and micro-batch, the reference's loop over
    experts) and one per evaluation. The history keeps its Python numbers."""
    counts = count_host_reads(monkeypatch)
    steps, accum, n_moe = 3, 2, 3  # small_config: 2 MoE blocks + 1 MTP module
    run = train(MODEL, config(data, steps=steps, grad_accum=accum, eval_every=3, capacity_factor=1.0))
    assert counts.pop("kernels/moe.py") == steps * accum * n_moe + config(data).eval_batches * n_moe
    assert counts == {"train.py": 2 * steps + 1}  # + 1: the one evaluation
    entry = run.history[-1]
    assert all(
        type(entry[k]) is float
        for k in (
            "loss",
            "main_loss",
            "mtp_loss",
            "balance_loss",
            "grad_norm",
            "max_vio",
            "val_loss",
            "val_mtp_loss",
            "val_max_vio",
        )
    )
    assert all(type(v) is int for row in entry["loads"] for v in row)
    assert all(type(v) is float for k in ("dropped", "groups_per_token", "max_vio_layers") for v in entry[k])


@pytest.mark.slow
def test_domains_mix(data):
    r = train(MODEL, config(data, steps=2, domains={"shakespeare": 1, "arithmetic": 1, "code": 1}, eval_every=2))
    assert r.history[-1]["val_loss"] > 0 and r.config.domains == {"shakespeare": 1, "arithmetic": 1, "code": 1}


@pytest.mark.slow
def test_cli_train_resume_and_sample(data, tmp_path, capsys):
    MODEL.save(tmp_path / "model")
    out = str(tmp_path / "cli")
    common = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--data-dir", str(data), "--no-progress"]
    assert (
        main(["train", "--config", str(tmp_path / "model"), "--steps", "2", "--eval-every", "2", "--out", out, *common])
        == 0
    )
    printed = capsys.readouterr().out
    assert "validation: loss" in printed and "checkpoint-000002" in printed
    assert main(["train", "--config", str(tmp_path / "model"), "--steps", "2", "--out", out, *common]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--steps", "3", "--no-progress"]) == 0  # settings from the run
    assert find_checkpoint(out).name == "checkpoint-000003"
    capsys.readouterr()
    assert (
        main(["sample", "--checkpoint", out, "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:\n")
    assert main(["train", "--steps", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "argument --steps: must be a positive integer, got '-1'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cli_lists_train_and_sample():
    out = subprocess.run([sys.executable, "-m", "dsv3", "--help"], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "sample" in out
