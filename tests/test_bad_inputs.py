"""Hostile input and interruptions: every case ends in one clear error naming the field, tensor or file (or in the
right result), never a silent partial result; nothing on disk is lost. Each test is a regression test of a case that
once slipped through (issue 10)."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import ModelConfig, atomic, generate, load_pretrained, rundir, save_pretrained
from dsv3.checkpoint import INDEX_NAME, CheckpointError
from dsv3.cli import main
from dsv3.rundir import RunDirectoryError, RunLock, find_checkpoint, list_checkpoints
from dsv3.train import TrainConfig, train
from helpers import random_model, small_config

RUN_MODEL = small_config(vocab_size=2048)  # the bundled tokenizer's vocabulary


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "field, value",
    [
        ("rms_norm_eps", float("nan")),
        ("routed_scaling_factor", float("inf")),
        ("initializer_range", float("nan")),
        ("rope_theta", float("inf")),
        ("aux_loss_alpha", float("-inf")),
    ],
)
def test_non_finite_config_floats_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a finite number"):
        small_config(**{field: value})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("factor", float("nan"), r"rope_scaling\.factor must be a finite number"),
        ("mscale", float("inf"), r"rope_scaling\.mscale must be a finite number"),
        ("mscale_all_dim", float("nan"), r"rope_scaling\.mscale_all_dim must be a finite number"),
        ("factor", 0, r"rope_scaling\.factor must be > 0, got 0"),  # was silently turned into 1
        ("factor", -2.0, r"rope_scaling\.factor must be > 0"),
    ],
)
def test_bad_yarn_values_are_refused(key, value, message):
    rs = dict(small_config().rope_scaling, **{key: value})
    with pytest.raises(ValueError, match=message):
        small_config(rope_scaling=rs)


@pytest.mark.parametrize("field, value", [("eos_token_id", 320), ("bos_token_id", -1), ("pad_token_id", 10_000)])
def test_special_token_ids_outside_the_vocabulary_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}={value} is not a token id .*vocab_size=320"):
        small_config(**{field: value})


def test_from_hf_names_missing_and_misspelt_keys(tmp_path):
    with pytest.raises(ValueError, match=r"config dict: missing required keys \['vocab_size'"):
        ModelConfig.from_hf({})  # once silently the 671B model
    hf = small_config().to_hf()
    hf["num_hidden_layer"] = hf.pop("num_hidden_layers")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    with pytest.raises(
        ValueError,
        match=r"config\.json: missing required keys \['num_hidden_layers'\]; unknown keys "
        r"'num_hidden_layer' \(did you mean 'num_hidden_layers'\?\)",
    ):
        ModelConfig.from_hf(path)
    hf = small_config().to_hf()
    hf["n_routed_expert"] = 4  # a typo next to the real key is still a typo
    with pytest.raises(ValueError, match=r"unknown keys 'n_routed_expert' \(did you mean 'n_routed_experts'\?\)"):
        ModelConfig.from_hf(hf)
    hf = small_config().to_hf()
    hf.update(output_attentions=False, id2label={"0": "a"}, problem_type=None)  # transformers' bookkeeping: fine
    assert ModelConfig.from_hf(hf) == small_config()


@pytest.mark.parametrize("text, kind", [("[]", "list"), ("null", "null"), ("3", "int"), ('"x"', "str")])
def test_from_hf_refuses_json_that_is_not_an_object(tmp_path, text, kind):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: a config must be a JSON object .* got {kind}"):
        ModelConfig.from_hf(tmp_path)


# ---------------------------------------------------------------------- checkpoints: FP8 scales and finiteness
def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


WEIGHT = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"


def test_block_scale_next_to_a_non_fp8_weight_is_refused(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path, fp8=True)

    def int8(t):
        t[WEIGHT] = t[WEIGHT].view(torch.int8)  # the same bytes, loaded raw they were 100-1000x too large

    _rewrite(tmp_path, int8)
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors: tensor {WEIGHT} has a {WEIGHT}_scale_inv but "
        r"dtype torch\.int8",
    ):
        load_pretrained(tmp_path)


def test_e5m2_weights_with_block_scales_are_dequantized(tmp_path):
    model = random_model(small_config())
    save_pretrained(model, tmp_path, fp8=True)
    scales = {}

    def e5m2(t):
        w = (
            t[WEIGHT].float()
            * t[WEIGHT + "_scale_inv"]
            .repeat_interleave(128, 0)
            .repeat_interleave(128, 1)[: t[WEIGHT].shape[0], : t[WEIGHT].shape[1]]
        )
        scale = w.abs().amax() / 57344.0  # e5m2's largest finite value, one block here
        t[WEIGHT] = (w / scale).to(torch.float8_e5m2)
        t[WEIGHT + "_scale_inv"] = torch.full_like(t[WEIGHT + "_scale_inv"], float(scale))
        scales["expected"] = t[WEIGHT].float() * scale

    _rewrite(tmp_path, e5m2)
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.layers[0].self_attn.kv_a_proj_with_mqa.weight.detach(), scales["expected"])


def test_orphan_scale_is_refused_under_strict(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.mlp.gate_proj_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(
        CheckpointError,
        match=r"scale model\.layers\.0\.mlp\.gate_proj_scale_inv has no "
        r"weight model\.layers\.0\.mlp\.gate_proj in the same file",
    ):
        load_pretrained(tmp_path)
    load_pretrained(tmp_path, strict=False)


@pytest.mark.parametrize(
    "fp8, target, value",
    [
        (False, WEIGHT, float("nan")),
        (False, "lm_head.weight", float("inf")),
        (True, WEIGHT + "_scale_inv", float("inf")),
        (True, WEIGHT + "_scale_inv", float("nan")),
    ],
)
def test_non_finite_weights_or_scales_are_refused_on_load(tmp_path, fp8, target, value):
    save_pretrained(random_model(small_config()), tmp_path, fp8=fp8)

    def poison(t):
        t[target] = t[target].clone()
        t[target].view(-1)[0] = value

    _rewrite(tmp_path, poison)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {target} holds 1 non-finite values"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("fp8", [False, True])
def test_saving_a_non_finite_weight_is_refused_and_writes_nothing(tmp_path, fp8):
    model = random_model(small_config())
    with torch.no_grad():
        model.layers[0].self_attn.kv_a_proj_with_mqa.weight[3, 5] = float("inf")  # FP8 would write a block of NaN
    with pytest.raises(CheckpointError, match=rf"tensor {WEIGHT} holds 1 non-finite values"):
        save_pretrained(model, tmp_path / "m", fp8=fp8)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_index_entries_that_leave_the_checkpoint_directory_are_refused(tmp_path, entry):
    ckpt = tmp_path / "ckpt"
    save_pretrained(random_model(small_config()), ckpt, max_shard_bytes=200_000)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = entry
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{INDEX_NAME}: tensor {key} is mapped to .*not a file name inside"):
        load_pretrained(ckpt)


# ---------------------------------------------------------------------- checkpoints written by transformers
def test_a_transformers_fine_tune_without_mtp_loads_as_the_main_model(tmp_path):
    import transformers

    transformers.logging.set_verbosity_error()
    model = random_model(small_config())
    save_pretrained(model, tmp_path / "ours")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "theirs")  # keeps num_nextn_predict_layers=1, writes no MTP layer
    assert json.loads((tmp_path / "theirs" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_pretrained(tmp_path / "theirs", dtype=torch.float32)
    mine = [w for w in caught if "MTP" in str(w.message)]
    assert len(mine) == 1 and "holds no MTP tensors" in str(mine[0].message)
    assert len(loaded.mtp) == 0 and loaded.config.num_nextn_predict_layers == 0
    ids = torch.randint(0, 320, (2, 10))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="speculative decoding drafts with the MTP modules, but this model has none"):
        generate(loaded, ids[0], 4, speculative=True)


# ---------------------------------------------------------------------- atomic directory replace
def test_an_interrupted_in_place_save_leaves_the_old_model_whole(tmp_path, monkeypatch):
    path = tmp_path / "model"
    old, new = random_model(small_config(), seed=1), random_model(small_config(), seed=2)
    save_pretrained(old, path, max_shard_bytes=60_000)
    (path / "README.md").write_text("notes")  # a file of the user's, not of the model
    n_shards = len(list(path.glob("model-*.safetensors")))
    assert n_shards > 5
    calls = {"n": 0}
    real = atomic.atomic_save_file

    def dies_after_five(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("killed after 5 shards")
        return real(*args, **kw)

    monkeypatch.setattr("dsv3.checkpoint.atomic_save_file", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(new, path, max_shard_bytes=60_000)
    monkeypatch.undo()
    ids = torch.randint(0, 320, (1, 8))
    assert torch.equal(logits(load_pretrained(path, dtype=torch.float32), ids), logits(old, ids))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the half-written copy is gone
    save_pretrained(new, path)  # the next save replaces everything and keeps the user's file
    assert torch.equal(logits(load_pretrained(path, dtype=torch.float32), ids), logits(new, ids))
    assert (path / "README.md").read_text() == "notes"
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_a_killed_save_leaves_temporaries_that_the_next_save_removes(tmp_path):
    path = tmp_path / "model"
    save_pretrained(random_model(small_config()), path)
    leftover = atomic.temp_dir_beside(path)  # what a writer killed before its swap leaves
    (leftover / "model.safetensors").write_bytes(b"partial")
    save_pretrained(random_model(small_config()), path)
    assert not leftover.exists()


def test_directory_exchange_is_atomic_where_supported(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("A"), (b / "f").write_text("B")
    if atomic.exchange(a, b):
        assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"
    else:  # pragma: no cover - a file system without RENAME_EXCHANGE: replace_directory renames aside instead
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here")


def test_written_files_are_as_readable_as_their_directory(tmp_path):
    old = os.umask(0o022)
    try:
        save_pretrained(random_model(small_config()), tmp_path / "m")
        atomic.atomic_write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    for p in [tmp_path / "m", *(tmp_path / "m").iterdir(), tmp_path / "x.txt"]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044 == 0o044, (p, oct(mode))


# ---------------------------------------------------------------------- generation
def test_a_huge_num_draft_is_clamped_to_what_can_be_drafted():
    model = random_model(small_config())
    gen = generate(model, [5, 6, 7], 6, speculative=True, num_draft=10**9)  # allocated per draft and died before
    assert gen.stats.num_draft == 5
    assert torch.equal(gen.tokens, generate(model, [5, 6, 7], 6).tokens)  # greedy speculative == greedy


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"temperature": float("nan")}, r"temperature must be >= 0 \(0 = greedy\) and finite"),
        ({"temperature": float("inf")}, "and finite, got inf"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_non_finite_sampling_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        generate(random_model(small_config()), [1, 2], 2, **kw)


# ---------------------------------------------------------------------- the run directory
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dsv3.data import DOMAIN_FILES, data_dir

    d = tmp_path_factory.mktemp("data")
    src = data_dir()
    (d / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    for name in DOMAIN_FILES.values():
        text = (src / name).read_bytes().decode()
        (d / name).write_bytes(text[: text.index("\n", 20_000) + 1].encode())
    return d


def run_config(data, out, **kw):
    base = dict(
        steps=2,
        batch_size=2,
        seq_len=16,
        warmup_steps=1,
        eval_every=0,
        save_every=1,
        data_dir=str(data),
        out_dir=str(out),
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    train(RUN_MODEL, run_config(data, out))
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def no_compute(monkeypatch):
    """Make any model construction fail loudly: errors must come before compute."""

    def boom(*a, **k):
        raise AssertionError("compute started before the error")

    monkeypatch.setattr("dsv3.train.init_model", boom)
    monkeypatch.setattr("dsv3.train.load_pretrained", boom)


def test_a_second_run_into_a_locked_directory_is_refused_naming_the_holder(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with RunLock(out):
        no_compute(monkeypatch)
        with pytest.raises(
            RunDirectoryError,
            match=rf"out_dir '{out}' is in use by another training run "
            rf"\(pid {os.getpid()} on ",
        ):
            train(RUN_MODEL, run_config(data, out))
    assert not (out / ".lock").exists()  # released


def test_a_second_cli_run_exits_2_naming_the_other_process(data, tmp_path, capsys):
    out = tmp_path / "run"
    code = (
        "import sys, time; from dsv3.rundir import RunLock; RunLock(sys.argv[1]).acquire(); print('held', "
        "flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", "--out", str(out), "--steps", "1", "--data-dir", str(data), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is in use by another training run (pid {holder.pid} on" in err
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_an_unwritable_out_is_refused_before_any_compute(data, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    no_compute(monkeypatch)
    with pytest.raises(RunDirectoryError, match=rf"out_dir '{blocker / 'run'}' cannot be created or written"):
        train(RUN_MODEL, run_config(data, blocker / "run"))


@pytest.mark.parametrize(
    "pointer", ["../other/checkpoint-000002", "/tmp/checkpoint-000002", "checkpoint-2/../x", "model"]
)
def test_a_latest_pointer_outside_the_run_is_refused(finished_run, tmp_path, pointer):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "latest").write_text(pointer + "\n")
    with pytest.raises(RunDirectoryError, match=r"latest names .* which is not a checkpoint of this run"):
        find_checkpoint(run)


def _damage_json(run, edit):
    ckpt = find_checkpoint(run)
    path = ckpt / "trainer.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    return ckpt


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("data"), r"trainer\.json: entry 'data' is missing"),
        (lambda s: s.pop("history"), r"trainer\.json: entry 'history' is missing"),
        (lambda s: s.update(step="two"), r"trainer\.json: entry 'step' must be a int"),
        (lambda s: s.update(data={"step": "x"}), r"trainer\.json: entry 'data' \(the data position\) is damaged"),
    ],
)
def test_damaged_trainer_json_is_named_before_any_compute(data, finished_run, tmp_path, monkeypatch, edit, message):
    run = copy_run(finished_run, tmp_path / "run")
    _damage_json(run, edit)
    if "data position" not in message:  # the data position is checked after the model is built, before training
        no_compute(monkeypatch)
    with pytest.raises(RunDirectoryError, match=message):
        train(RUN_MODEL, run_config(data, run, steps=3), resume=True)


@pytest.mark.parametrize(
    "drop, message",
    [
        ("rng.torch", r"entry 'rng\.torch' \(the RNG state\) is missing"),
        ("optimizer.lm_head.weight.exp_avg_sq", r"entry optimizer\.lm_head\.weight\.exp_avg_sq is missing"),
    ],
)
def test_damaged_trainer_tensors_are_named(data, finished_run, tmp_path, drop, message):
    run = copy_run(finished_run, tmp_path / "run")
    ckpt = find_checkpoint(run)
    tensors = load_file(str(ckpt / "trainer.safetensors"))
    del tensors[drop]
    save_file(tensors, str(ckpt / "trainer.safetensors"))
    with pytest.raises(RunDirectoryError, match=rf"trainer\.safetensors: {message}"):
        train(RUN_MODEL, run_config(data, run, steps=3), resume=True)


def test_not_json_trainer_state_exits_2_from_the_cli(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    (find_checkpoint(run) / "trainer.json").write_text("{not json")
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainer.json: not valid JSON" in err


def test_checkpoints_are_ordered_by_step_number_and_temporaries_cleaned(data, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    for name in ("checkpoint-1000000", "checkpoint-999999", "checkpoint-000010", "notes"):
        (run / name).mkdir()
    assert [p.name for p in list_checkpoints(run)][-3:] == [
        "checkpoint-000010",
        "checkpoint-999999",
        "checkpoint-1000000",
    ]
    stale = atomic.temp_dir_beside(run / "checkpoint-000003")
    with RunLock(run):
        assert not stale.exists()


def test_latest_moves_only_after_the_checkpoint_is_on_disk(data, tmp_path, monkeypatch):
    events = []
    real_fsync, real_write = rundir.fsync_dir, rundir.atomic_write_text
    monkeypatch.setattr(rundir, "fsync_dir", lambda p: (events.append(("fsync", os.path.basename(p))), real_fsync(p)))
    monkeypatch.setattr(rundir, "atomic_write_text", lambda p, t: (events.append(("write", p.name)), real_write(p, t)))
    out = tmp_path / "run"
    train(RUN_MODEL, run_config(data, out, steps=1))
    latest = events.index(("write", "latest"))
    assert ("fsync", "run") in events[:latest]


@pytest.mark.slow
def test_kill_9_then_resume_is_exact(data, tmp_path):
    """A run killed with SIGKILL mid-training resumes from its last checkpoint and ends bit-identical to a run that
    was never interrupted (also: the killed run's lock does not block the resume)."""
    cfg = small_config(vocab_size=2048)
    cfg.save(tmp_path / "model")
    flags = [
        "--config",
        str(tmp_path / "model"),
        "--steps",
        "8",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--save-every",
        "1",
        "--eval-every",
        "0",
        "--data-dir",
        str(data),
        "--no-progress",
        "--threads",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", "dsv3", "train", "--out", str(tmp_path / "full"), *flags],
        check=True,
        env=env,
        timeout=600,
        capture_output=True,
    )
    victim = subprocess.Popen(
        [sys.executable, "-m", "dsv3", "train", "--out", str(tmp_path / "cut"), *flags],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpt = find_checkpoint(tmp_path / "cut") if (tmp_path / "cut" / "latest").exists() else None
        if ckpt is not None and rundir.checkpoint_step(ckpt) >= 3:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dsv3",
            "train",
            "--out",
            str(tmp_path / "cut"),
            "--resume",
            "--steps",
            "8",
            "--no-progress",
            "--threads",
            "1",
        ],
        check=True,
        env=env,
        timeout=600,
        capture_output=True,
    )
    a, b = find_checkpoint(tmp_path / "full"), find_checkpoint(tmp_path / "cut")
    assert a.name == b.name == "checkpoint-000008"
    for name in ("model.safetensors", "trainer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert (
        json.loads((a / "trainer.json").read_text())["history"]
        == json.loads((b / "trainer.json").read_text())["history"]
    )


# ---------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    save_pretrained(random_model(small_config(vocab_size=2048)), d)
    return d


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "--threads", "-1", "--prompt-ids", "1"],
            "argument --threads: must be a positive integer, got '-1'",
        ),
        (["sample", "--threads", "0"], "argument --threads: must be a positive integer, got '0'"),
        (["train", "--threads", "-1", "--out", "x"], "argument --threads: must be a positive integer, got '-1'"),
        (["generate", "--temperature", "nan", "--prompt-ids", "1"], "argument --temperature: must be a finite number"),
        (["sample", "--temperature", "-1"], "argument --temperature: must be >= 0"),
        (["generate", "--top-p", "1.5", "--prompt-ids", "1"], r"argument --top-p: must be in (0, 1]"),
        (["generate", "--device", "bogus", "--prompt-ids", "1"], "--device 'bogus' is not a device"),
        (["generate", "--device", "cuda", "--prompt-ids", "1"], "--device is 'cuda', but CUDA is not available"),
        (["train", "--device", "bogus", "--out", "x"], "--device 'bogus' is not a device"),
        (["generate", "--prompt-ids=-5"], "--prompt-ids holds token id -5; token ids are >= 0"),
        (["generate", "--prompt-ids", "1 x"], "--prompt-ids must be integers"),
        (["generate", "--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text"),
        (["sample", "--prompt", "\udcff"], "--prompt is not valid UTF-8 text"),
        (["generate", "--num-draft", "0", "--prompt-ids", "1"], "argument --num-draft: must be a positive integer"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(model_dir, capsys, argv, message):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("a GPU is present")
    if argv[0] in ("generate", "sample"):
        argv = [*argv, "--checkpoint", str(model_dir)]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert message in out.err


@pytest.mark.parametrize("text, kind", [("[]", "list"), ("null", "null")])
def test_cli_config_that_is_not_an_object_names_the_file(tmp_path, capsys, text, kind):
    (tmp_path / "config.json").write_text(text)
    assert main(["info", "--config", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'config.json'}: a config must be a JSON object" in err


def test_cli_generate_with_a_huge_num_draft_works(model_dir, capsys):
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(model_dir),
                "--prompt-ids",
                "1 2 3",
                "--max-new-tokens",
                "4",
                "--speculative",
                "--num-draft",
                str(10**9),
                "--no-stop",
            ]
        )
        == 0
    )
    assert "4 tokens in" in capsys.readouterr().out  # the stats line: the run did not die allocating 10**9 drafts


@pytest.mark.parametrize("command", ["info", "train", "sample", "generate"])
def test_every_subcommand_shows_defaults_and_threads_in_help(command):
    out = subprocess.run(
        [sys.executable, "-m", "dsv3", command, "--help"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "(default:" in out
    if command != "info":
        assert "--threads" in out
    if command in ("sample", "generate"):
        assert "half the cores" in " ".join(out.split())


def test_threads_flag_sets_torch_threads(model_dir, capsys):
    before = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "generate",
                    "--checkpoint",
                    str(model_dir),
                    "--prompt-ids",
                    "1",
                    "--max-new-tokens",
                    "1",
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- a second probe (hostile user, round 2)
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_nextn_predict_layers": True}, r"ModelConfig\.num_nextn_predict_layers must be a non-negative integer"),
        ({"topk_method": "greedy"}, r"ModelConfig\.topk_method must be 'noaux_tc'"),  # once built noaux_tc routing
        ({"torch_dtype": "float99"}, r"ModelConfig\.torch_dtype must be one of"),  # once loaded as bfloat16
        ({"torch_dtype": "int8"}, r"ModelConfig\.torch_dtype must be one of"),
        ({"num_key_value_heads": 3}, r"ModelConfig\.num_key_value_heads=3 must equal num_attention_heads=4"),
        ({"aux_loss_alpha": -1.0}, r"ModelConfig\.aux_loss_alpha must be >= 0"),
        ({"quantization_config": "fp8"}, r"ModelConfig\.quantization_config must be an object or null"),
        ({"quantization_config": {"quant_method": "int4"}}, r"quantization_config\.quant_method must be 'fp8'"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
            r"quantization_config\.weight_block_size must be \[128, 128\]",
        ),
        ({"rope_scaling": []}, r"ModelConfig\.rope_scaling must be an object of YaRN settings or null"),  # was no RoPE
        ({"rope_scaling": "yarn"}, r"ModelConfig\.rope_scaling must be an object"),
    ],
)
def test_config_values_that_once_passed_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("original_max_position_embeddings", 1.5, r"rope_scaling\.original_max_position_embeddings must be an integer"),
        ("fatcor", 3.0, r"rope_scaling has unknown keys 'fatcor' \(did you mean 'factor'\?\)"),
    ],
)
def test_rope_scaling_typos_and_fractions_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        small_config(rope_scaling=dict(small_config().rope_scaling, **{key: value}))


def test_from_hf_refuses_duplicate_keys_bad_eos_lists_and_rope_types(tmp_path):
    hf = small_config().to_hf()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf)[:-1] + ', "hidden_size": 65}')  # JSON keeps the last one silently
    with pytest.raises(ValueError, match=rf"{path}: key 'hidden_size' appears more than once"):
        ModelConfig.from_hf(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON \(RecursionError"):
        ModelConfig.from_hf(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(hf).encode())  # a BOM from a Windows editor is fine
    assert ModelConfig.from_hf(path) == small_config()
    for eos in ([], [1, 999]):  # [] was an IndexError, 999 was ignored
        with pytest.raises(ValueError, match=r"config dict: eos_token_id=.* must list token ids of the vocabulary"):
            ModelConfig.from_hf(dict(hf, eos_token_id=eos))
    with pytest.raises(ValueError, match=r"config dict: rope_parameters must be an object or null, got 'x'"):
        ModelConfig.from_hf(dict(hf, rope_parameters="x"))
    with pytest.raises(ValueError, match=r"config dict: rope_scaling must be an object or null, got 5"):
        ModelConfig.from_hf(dict(hf, rope_scaling=5))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: dsv3.kv_cache_bytes(c, 1.5), r"seq_len must be an integer >= 0, got 1\.5"),  # returned 360.0
        (lambda c: dsv3.kv_cache_bytes(c, float("nan")), r"seq_len must be an integer >= 0, got nan"),
        (lambda c: dsv3.kv_cache_bytes(c, 10, batch=2.5), r"batch must be a positive integer, got 2\.5"),
        (lambda c: dsv3.kv_cache_bytes(c, 10, dtype="bf16"), r"dtype must be a torch\.dtype"),
        (lambda c: dsv3.kv_cache_bytes(c.to_hf(), 10), r"config must be a dsv3\.ModelConfig .* got dict"),
        (lambda c: dsv3.count_parameters(None), r"config must be a dsv3\.ModelConfig .* got NoneType"),
    ],
)
def test_accounting_refuses_non_integer_sizes_and_non_configs(call, message):
    with pytest.raises(ValueError, match=message):
        call(small_config())


# checkpoints
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_non_float_weight_is_refused_not_cast(tmp_path, dtype):
    save_pretrained(random_model(small_config()), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({WEIGHT: t[WEIGHT].to(dtype)}))  # int64 truncated every weight to 0
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors: tensor {WEIGHT} has dtype {dtype}; a "
        r"floating-point weight is expected",
    ):
        load_pretrained(tmp_path)


def test_a_weight_that_overflows_the_load_dtype_is_refused(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path)
    _rewrite(tmp_path, lambda t: t[WEIGHT].view(-1).__setitem__(0, 1e38))  # finite in fp32, Inf in fp16
    with pytest.raises(CheckpointError, match=rf"tensor {WEIGHT} holds values too large for torch\.float16"):
        load_pretrained(tmp_path, dtype=torch.float16)
    load_pretrained(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_block_scales_must_be_positive(tmp_path, scale):
    save_pretrained(random_model(small_config()), tmp_path, fp8=True)
    S = WEIGHT + "_scale_inv"
    _rewrite(tmp_path, lambda t: t.update({S: torch.full_like(t[S], scale)}))  # zeroed or negated the weight
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: {S} holds 1 scales <= 0"):
        load_pretrained(tmp_path)


def test_an_index_entry_for_a_tensor_its_shard_lacks_is_refused(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shard = index["weight_map"][WEIGHT]
    index["weight_map"]["model.ghost.weight"] = shard  # was ignored
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=rf"{INDEX_NAME} maps tensor model\.ghost\.weight to .*{shard}, which "
        r"does not hold it",
    ):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"dtype": "float32"}, r"load_pretrained: dtype must be None or one of"),  # was 'Invalid device string'
        ({"dtype": torch.int8}, r"load_pretrained: dtype must be None or one of"),
        ({"dtype": torch.float8_e4m3fn}, r"load_pretrained: dtype must be None or one of"),  # loaded as FP8
        ({"device": "bogus"}, r"load_pretrained: device 'bogus' is not a device"),
        ({"device": "meta"}, r"load_pretrained: device 'meta' holds no weights"),  # returned a model without weights
    ],
)
def test_load_pretrained_refuses_bad_dtype_and_device(tmp_path, kw, message):
    save_pretrained(random_model(small_config()), tmp_path)
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path, **kw)
    with pytest.raises(ValueError, match=r"load_pretrained: path must be a directory path, got None"):
        load_pretrained(None)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"max_shard_bytes": -1}, r"max_shard_bytes must be a positive integer \(bytes\) or None, got -1"),
        ({"max_shard_bytes": "1GB"}, r"max_shard_bytes must be a positive integer"),
        ({"dtype": torch.int8}, r"save_pretrained: dtype must be None or one of"),  # wrote truncated integers
        ({"dtype": "bf16"}, r"save_pretrained: dtype must be None or one of"),
    ],
)
def test_save_pretrained_refuses_bad_sizes_and_dtypes(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        save_pretrained(random_model(small_config()), tmp_path / "m", **kw)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match=r"save_pretrained needs a dsv3\.DeepSeekV3 model .* got Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "m")


def test_tied_embeddings_save_load_and_a_differing_head_is_refused(tmp_path):
    model = random_model(small_config(tie_word_embeddings=True))
    save_pretrained(model, tmp_path)  # was a safetensors RuntimeError about shared memory
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, 320, (1, 6))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": torch.zeros(320, 64)}))  # was silently dropped
    with pytest.raises(
        CheckpointError,
        match=r"tie_word_embeddings=true\), but tensor lm_head\.weight differs from "
        r"model\.embed_tokens\.weight",
    ):
        load_pretrained(tmp_path)


# the model's forward
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"input_ids": [[1, 2]]}, r"input_ids must be an integer tensor of shape \(batch, seq\), got list"),
        ({"labels": torch.full((2, 8), 320)}, r"labels holds token id 320, outside the vocabulary \[0, 320\)"),
        ({"labels": torch.full((2, 8), -5)}, r"labels holds token id -5"),  # was torch's IndexError
        ({"labels": torch.full((2, 8), -100)}, r"labels are all the ignore index -100"),  # was a NaN loss
        ({"labels": torch.ones(2, 8)}, r"labels must be an integer tensor like input_ids, got torch\.float32"),
        (
            {"attention_mask": torch.full((2, 8), 0.5)},
            r"attention_mask must hold only 1 \(token\) and 0 \(padding\), "
            r"got 0\.5",
        ),  # was read as 1
        ({"attention_mask": [[1] * 8] * 2}, r"attention_mask must be a tensor"),
        ({"position_ids": torch.arange(3)}, r"position_ids must be an integer tensor of shape \(2, 8\)"),
        (
            {"position_ids": torch.full((2, 8), 10**6)},
            r"position_ids holds position 1000000, outside \[0, "
            r"max_position_embeddings=512\)",
        ),
        ({"labels": torch.ones(2, 8, dtype=torch.long), "mtp_weight": float("nan")}, r"mtp_weight must be a finite"),
    ],
)
def test_forward_refuses_bad_labels_masks_and_positions(kw, message):
    model = random_model(small_config())
    kw = {"input_ids": torch.randint(0, 320, (2, 8)), **kw}
    with pytest.raises(ValueError, match=message):
        model(**kw)


def test_int32_labels_give_the_int64_loss():
    model = random_model(small_config())
    ids = torch.randint(0, 320, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids, labels=ids.int()).loss, model(ids, labels=ids).loss)  # was a RuntimeError


# generation
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"seed": -1, "temperature": 1.0}, r"seed must be None or an integer in \[0, 2\*\*64\), got -1"),
        ({"seed": 1.5, "temperature": 1.0}, r"seed must be None or an integer"),  # was torch's RuntimeError
        ({"seed": 2**70, "temperature": 1.0}, r"seed must be None or an integer"),
        ({"stop_tokens": [999]}, r"stop_tokens holds 999, not a token id of the vocabulary \[0, 320\)"),
        ({"stop_tokens": "1"}, r"stop_tokens must be a token id or a list of token ids, got '1'"),  # was ignored
        (
            {"attention_mask": torch.full((1, 2), 0.5), "input_ids": torch.tensor([[1, 2]])},
            r"attention_mask must hold only 1 \(token\) and 0 \(padding\), got 0\.5",
        ),
        ({"input_ids": [1, 10**30]}, r"prompt 0 holds token id 10{30}, outside the vocabulary"),  # was OverflowError
    ],
)
def test_generate_refuses_bad_seeds_stop_tokens_and_masks(kw, message):
    kw = {"input_ids": [1, 2], **kw}
    with pytest.raises(ValueError, match=message):
        generate(random_model(small_config()), kw.pop("input_ids"), 2, **kw)


def test_generate_refuses_a_model_with_nan_logits_and_non_models():
    model = random_model(small_config())
    with torch.no_grad():
        model.layers[0].self_attn.kv_a_proj_with_mqa.weight[0, 0] = float("nan")  # argmax of NaN gave token 0
    with pytest.raises(ValueError, match=r"the model's logits after the prompt are not finite"):
        generate(model, [1, 2, 3], 3)
    with pytest.raises(ValueError, match=r"generate needs a dsv3\.DeepSeekV3 model, got NoneType"):
        generate(None, [1], 2)


# training and data
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"progress": "no"}, r"TrainConfig\.progress must be true or false"),  # showed the bar
        ({"seed": 2**70}, r"TrainConfig\.seed must be below 2\*\*63"),
        ({"data_dir": ""}, r"TrainConfig\.data_dir is an empty path"),  # read the current directory
        ({"out_dir": ""}, r"TrainConfig\.out_dir is an empty path"),
    ],
)
def test_train_config_values_that_once_passed_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_a_model_too_big_for_the_machine_is_refused_before_allocating(data, tmp_path, monkeypatch):
    no_compute(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"the model has [\d,]+ parameters: training it needs about [\d,]+ GiB .* "
        r"more than the [\d,]+ GiB of cpu",
    ):
        train(ModelConfig.deepseek_v3(), run_config(data, tmp_path / "run", device="cpu"))  # began allocating 671B


def test_a_tokenizer_that_is_not_utf8_names_the_file(tmp_path):
    from dsv3.data import load_tokenizer

    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=rf"tokenizer file '{path}' is not valid UTF-8"):  # was a UnicodeDecodeError
        load_tokenizer(path)


def test_a_latest_that_is_a_directory_or_names_an_incomplete_checkpoint_is_named(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    ckpt = find_checkpoint(run)
    (ckpt / "trainer.json").unlink()
    with pytest.raises(
        RunDirectoryError,
        match=rf"names {ckpt.name}, which is not a complete checkpoint \(no "
        rf"{ckpt / 'trainer.json'}\)",
    ):
        find_checkpoint(run)
    (run / "latest").unlink()
    (run / "latest").mkdir()  # was "nothing to resume: holds no checkpoint"
    with pytest.raises(RunDirectoryError, match=rf"{run / 'latest'} is not a file"):
        find_checkpoint(run)


# the command line
@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "--threads", "100000", "--prompt-ids", "1"],
            "argument --threads: must be at most 1024",
        ),  # segfault
        (["sample", "--threads", "5000"], "argument --threads: must be at most 1024"),
        (["generate", "--prompt", ""], "--prompt encodes to no tokens"),
        (
            ["generate", "--prompt-ids", str(10**30)],
            "--prompt-ids holds token id 1" + "0" * 30 + ", outside the vocabulary",
        ),
        (["generate", "--device", "meta", "--prompt-ids", "1"], "device 'meta' holds no weights"),  # was a traceback
        (["train", "--out", "x", "--domains", "shakespeare=1,shakespeare=2"], "--domains names 'shakespeare' twice"),
    ],
)
def test_cli_errors_of_the_second_probe_are_one_line(model_dir, capsys, argv, message):
    if argv[0] in ("generate", "sample"):
        argv = [*argv, "--checkpoint", str(model_dir)]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert message in out.err


def test_cli_empty_checkpoint_path_is_refused(capsys):
    assert main(["generate", "--checkpoint", "", "--prompt-ids", "1"]) == 2  # loaded whatever the cwd held
    assert capsys.readouterr().err == "error: the checkpoint path is empty\n"


def test_cli_empty_device_is_refused(model_dir, capsys):
    assert main(["generate", "--checkpoint", str(model_dir), "--prompt-ids", "1", "--device", ""]) == 2  # was auto
    assert "--device '' is not a device" in capsys.readouterr().err


def test_training_a_model_without_moe_layers_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match=r"ModelConfig\.n_routed_experts=0: dsv3\.train trains DeepSeekMoE models"):
        train(small_config(n_routed_experts=0), TrainConfig(steps=1, out_dir=str(tmp_path / "run"), progress=False))
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
