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

from dsv3 import ModelConfig, generate, load_pretrained, save_pretrained
from dsv3 import atomic, rundir
from dsv3.checkpoint import INDEX_NAME, CheckpointError
from dsv3.cli import main
from dsv3.rundir import RunDirectoryError, RunLock, find_checkpoint, list_checkpoints
from dsv3.train import TrainConfig, train

from conftest import random_model, small_config

RUN_MODEL = small_config(vocab_size=2048)  # the bundled tokenizer's vocabulary


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------- config values
@pytest.mark.parametrize("field, value", [("rms_norm_eps", float("nan")), ("routed_scaling_factor", float("inf")),
                                          ("initializer_range", float("nan")), ("rope_theta", float("inf")),
                                          ("aux_loss_alpha", float("-inf"))])
def test_non_finite_config_floats_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a finite number"):
        small_config(**{field: value})


@pytest.mark.parametrize("key, value, message", [
    ("factor", float("nan"), r"rope_scaling\.factor must be a finite number"),
    ("mscale", float("inf"), r"rope_scaling\.mscale must be a finite number"),
    ("mscale_all_dim", float("nan"), r"rope_scaling\.mscale_all_dim must be a finite number"),
    ("factor", 0, r"rope_scaling\.factor must be > 0, got 0"),  # was silently turned into 1
    ("factor", -2.0, r"rope_scaling\.factor must be > 0"),
])
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
    with pytest.raises(ValueError, match=r"config\.json: missing required keys \['num_hidden_layers'\]; unknown keys "
                                         r"'num_hidden_layer' \(did you mean 'num_hidden_layers'\?\)"):
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
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {WEIGHT} has a {WEIGHT}_scale_inv but "
                                              r"dtype torch\.int8"):
        load_pretrained(tmp_path)


def test_e5m2_weights_with_block_scales_are_dequantized(tmp_path):
    model = random_model(small_config())
    save_pretrained(model, tmp_path, fp8=True)
    scales = {}

    def e5m2(t):
        w = t[WEIGHT].float() * t[WEIGHT + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)[
            : t[WEIGHT].shape[0], : t[WEIGHT].shape[1]]
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
    with pytest.raises(CheckpointError, match=r"scale model\.layers\.0\.mlp\.gate_proj_scale_inv has no "
                                              r"weight model\.layers\.0\.mlp\.gate_proj in the same file"):
        load_pretrained(tmp_path)
    load_pretrained(tmp_path, strict=False)


@pytest.mark.parametrize("fp8, target, value", [(False, WEIGHT, float("nan")), (False, "lm_head.weight", float("inf")),
                                                (True, WEIGHT + "_scale_inv", float("inf")),
                                                (True, WEIGHT + "_scale_inv", float("nan"))])
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


@pytest.mark.parametrize("kw, message", [({"temperature": float("nan")}, r"temperature must be >= 0 \(0 = greedy\) and finite"),
                                         ({"temperature": float("inf")}, "and finite, got inf"),
                                         ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]")])
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
    base = dict(steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=0, save_every=1, data_dir=str(data),
                out_dir=str(out), progress=False)
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
        with pytest.raises(RunDirectoryError, match=rf"out_dir '{out}' is in use by another training run "
                                                    rf"\(pid {os.getpid()} on "):
            train(RUN_MODEL, run_config(data, out))
    assert not (out / ".lock").exists()  # released


def test_a_second_cli_run_exits_2_naming_the_other_process(data, tmp_path, capsys):
    out = tmp_path / "run"
    code = ("import sys, time; from dsv3.rundir import RunLock; RunLock(sys.argv[1]).acquire(); print('held', "
            "flush=True); time.sleep(60)")
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


@pytest.mark.parametrize("pointer", ["../other/checkpoint-000002", "/tmp/checkpoint-000002", "checkpoint-2/../x",
                                     "model"])
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


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("data"), r"trainer\.json: entry 'data' is missing"),
    (lambda s: s.pop("history"), r"trainer\.json: entry 'history' is missing"),
    (lambda s: s.update(step="two"), r"trainer\.json: entry 'step' must be a int"),
    (lambda s: s.update(data={"step": "x"}), r"trainer\.json: entry 'data' \(the data position\) is damaged"),
])
def test_damaged_trainer_json_is_named_before_any_compute(data, finished_run, tmp_path, monkeypatch, edit, message):
    run = copy_run(finished_run, tmp_path / "run")
    _damage_json(run, edit)
    if "data position" not in message:  # the data position is checked after the model is built, before training
        no_compute(monkeypatch)
    with pytest.raises(RunDirectoryError, match=message):
        train(RUN_MODEL, run_config(data, run, steps=3), resume=True)


@pytest.mark.parametrize("drop, message", [("rng.torch", r"entry 'rng\.torch' \(the RNG state\) is missing"),
                                           ("optimizer.lm_head.weight.exp_avg_sq",
                                            r"entry optimizer\.lm_head\.weight\.exp_avg_sq is missing")])
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
    assert [p.name for p in list_checkpoints(run)][-3:] == ["checkpoint-000010", "checkpoint-999999",
                                                            "checkpoint-1000000"]
    stale = atomic.temp_dir_beside(run / "checkpoint-000003")
    with RunLock(run):
        assert not stale.exists()


def test_latest_moves_only_after_the_checkpoint_is_on_disk(data, tmp_path, monkeypatch):
    events = []
    real_fsync, real_write = rundir.fsync_dir, rundir.atomic_write_text
    monkeypatch.setattr(rundir, "fsync_dir", lambda p: (events.append(("fsync", os.path.basename(p))),
                                                        real_fsync(p)))
    monkeypatch.setattr(rundir, "atomic_write_text", lambda p, t: (events.append(("write", p.name)),
                                                                   real_write(p, t)))
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
    flags = ["--config", str(tmp_path / "model"), "--steps", "8", "--batch-size", "2", "--seq-len", "16",
             "--save-every", "1", "--eval-every", "0", "--data-dir", str(data), "--no-progress", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "dsv3", "train", "--out", str(tmp_path / "full"), *flags], check=True,
                   env=env, timeout=600, capture_output=True)
    victim = subprocess.Popen([sys.executable, "-m", "dsv3", "train", "--out", str(tmp_path / "cut"), *flags],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpt = find_checkpoint(tmp_path / "cut") if (tmp_path / "cut" / "latest").exists() else None
        if ckpt is not None and rundir.checkpoint_step(ckpt) >= 3:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    subprocess.run([sys.executable, "-m", "dsv3", "train", "--out", str(tmp_path / "cut"), "--resume", "--steps", "8",
                    "--no-progress", "--threads", "1"], check=True, env=env, timeout=600, capture_output=True)
    a, b = find_checkpoint(tmp_path / "full"), find_checkpoint(tmp_path / "cut")
    assert a.name == b.name == "checkpoint-000008"
    for name in ("model.safetensors", "trainer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert json.loads((a / "trainer.json").read_text())["history"] == json.loads((b / "trainer.json").read_text())[
        "history"]


# ---------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    save_pretrained(random_model(small_config(vocab_size=2048)), d)
    return d


@pytest.mark.parametrize("argv, message", [
    (["generate", "--threads", "-1", "--prompt-ids", "1"], "argument --threads: must be a positive integer, got '-1'"),
    (["sample", "--threads", "0"], "argument --threads: must be a positive integer, got '0'"),
    (["train", "--threads", "-1", "--out", "x"], "argument --threads: must be a positive integer, got '-1'"),
    (["generate", "--temperature", "nan", "--prompt-ids", "1"], "argument --temperature: must be a finite number"),
    (["sample", "--temperature", "-1"], "argument --temperature: must be >= 0"),
    (["generate", "--top-p", "1.5", "--prompt-ids", "1"], r"argument --top-p: must be in (0, 1]"),
    (["generate", "--device", "bogus", "--prompt-ids", "1"], "TrainConfig.device 'bogus' is not a device"),
    (["generate", "--device", "cuda", "--prompt-ids", "1"], "CUDA is not available"),
    (["generate", "--prompt-ids=-5"], "--prompt-ids holds token id -5; token ids are >= 0"),
    (["generate", "--prompt-ids", "1 x"], "--prompt-ids must be integers"),
    (["generate", "--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text"),
    (["sample", "--prompt", "\udcff"], "--prompt is not valid UTF-8 text"),
    (["generate", "--num-draft", "0", "--prompt-ids", "1"], "argument --num-draft: must be a positive integer"),
    (["bogus"], "invalid choice: 'bogus'"),
])
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
    assert main(["generate", "--checkpoint", str(model_dir), "--prompt-ids", "1 2 3", "--max-new-tokens", "4",
                 "--speculative", "--num-draft", str(10**9), "--no-stop"]) == 0
    assert "4 tokens in" in capsys.readouterr().out  # the stats line: the run did not die allocating 10**9 drafts


@pytest.mark.parametrize("command", ["info", "train", "sample", "generate"])
def test_every_subcommand_shows_defaults_and_threads_in_help(command):
    out = subprocess.run([sys.executable, "-m", "dsv3", command, "--help"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "(default:" in out
    if command != "info":
        assert "--threads" in out
    if command in ("sample", "generate"):
        assert "half the cores" in " ".join(out.split())


def test_threads_flag_sets_torch_threads(model_dir, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["generate", "--checkpoint", str(model_dir), "--prompt-ids", "1", "--max-new-tokens", "1",
                     "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
