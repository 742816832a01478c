"""The bundled corpus, tokenizer and batching (dsv3/data.py): determinism, correctness of the generated domains,
exact resume, fixed validation windows, and one clear error for each bad input."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import operator
import os
import re
import shutil
import subprocess
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from dsv3 import data
from dsv3.data import (
    DOMAINS,
    Batch,
    BatchIterator,
    build_data_files,
    corpus_stats,
    load_corpus,
    load_text,
    load_tokenizer,
    make_arithmetic,
    make_code,
    split_text,
    train_tokenizer,
    val_batches,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def corpus(tok):
    return load_corpus(DOMAINS, tok)


def _copy_data(tmp_path):
    for name in ("tinyshakespeare.txt", "arithmetic.txt", "code.txt", "tokenizer.json"):
        shutil.copy(data.data_dir() / name, tmp_path / name)
    return tmp_path


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_committed_tokenizer_has_2048_tokens_and_deepseek_special_ids(tok):
    assert tok.vocab_size == len(tok) == 2048
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.decode([0, 1]) == "<|bos|>" + "<|eos|>"
    model = json.loads((data.data_dir() / "tokenizer.json").read_text())["model"]
    assert model["type"] == "BPE" and model["vocab"]["<|bos|>"] == 0 and model["vocab"]["<|eos|>"] == 1
    assert len(model["vocab"]) == 2048 and len(model["merges"]) == 2048 - 2 - 256  # specials, bytes, merges


def test_tokenizer_training_is_deterministic_and_depends_on_the_text():
    texts = [load_text(d)[:40_000] for d in DOMAINS]
    first, second = train_tokenizer(texts, vocab_size=400), train_tokenizer(texts, vocab_size=400)
    assert first == second
    other = train_tokenizer([load_text("shakespeare")[40_000:80_000]], vocab_size=400)
    assert json.loads(other)["model"]["merges"] != json.loads(first)["model"]["merges"]
    assert len(json.loads(first)["model"]["vocab"]) == 400


def test_committed_files_are_what_build_data_files_produces(tmp_path):
    written = build_data_files(tmp_path, shakespeare=data.data_dir() / "tinyshakespeare.txt")
    for name, path in written.items():
        committed = data.data_dir() / path.name
        assert path.read_bytes() == committed.read_bytes(), f"{name}: {committed} differs from a fresh build"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "  leading and trailing  \n\n",
        "héllo wörld 日本語 🙂",
        "tabs\tand\r\nCRLF\x00nul",
        "<|eos|> is just text here <|bos|>",
        "def f(x):\n    return x * 2\n",
        "12 * (3 + 4) = 12 * 7 = 84",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # special ids come only from the pipeline


def test_round_trip_of_every_domain_through_the_corpus(tok, corpus):
    for d in DOMAINS:
        text = load_text(d)
        train_text, val_text = split_text(text)
        assert tok.decode(corpus.train[d]) == train_text
        assert tok.decode(corpus.val[d]) == val_text


def test_bpe_compresses_shakespeare(corpus):
    n_tokens = corpus.train["shakespeare"].numel() + corpus.val["shakespeare"].numel()
    assert len(load_text("shakespeare")) / n_tokens > 2.0  # BPE compresses: more than 2 characters per token


# ---------------------------------------------------------------------------------------------- generated domains


def test_generated_domains_are_deterministic_per_seed():
    assert make_arithmetic(300, seed=7) != make_arithmetic(300, seed=8)
    assert make_code(40, seed=7) != make_code(40, seed=8)
    assert make_arithmetic(300, seed=7).count("\n") == 300
    assert load_text("arithmetic") == data.generate_domain("arithmetic")
    assert load_text("code") == data.generate_domain("code")


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node):
    """Exact value of an integer expression with + - * / and unary minus (Fractions, so division is exact)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise AssertionError(f"unexpected syntax {ast.dump(node)}")


def test_every_arithmetic_line_is_correct():
    lines = load_text("arithmetic").splitlines()
    assert len(lines) == data.ARITHMETIC_LINES
    kinds = set()
    for line in lines:
        sides = line.split(" = ")
        assert len(sides) >= 2, line
        values = [_evaluate(ast.parse(s, mode="eval")) for s in sides]
        assert all(v == values[0] for v in values), line
        assert values[0].denominator == 1 and re.fullmatch(r"-?\d+", sides[-1]), line  # ends in an integer
        kinds.add(len(sides) if len(sides) > 2 else re.search(r" ([-+*/]) ", sides[0]).group(1))
    assert kinds >= {"+", "-", "*", "/", 3, 4}  # every kind of line, including worked multi-step ones


def test_every_code_snippet_runs_and_prints_what_it_claims():
    text = load_text("code")
    ast.parse(text)  # the whole domain is one valid Python file
    programs = re.findall(r".*?  # -> [^\n]*\n", text, flags=re.S)
    assert len(programs) == data.CODE_SNIPPETS
    for program in programs:
        claimed = program.rsplit("  # -> ", 1)[1].rstrip("\n")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(program, "<snippet>", "exec"), {})  # our own generated text, not untrusted input
        assert out.getvalue() == claimed + "\n", program


def test_domains_are_sized_as_designed():
    sizes = {d: len(load_text(d).encode()) for d in DOMAINS}
    assert sizes["shakespeare"] == 1_115_394
    for d in ("arithmetic", "code"):
        assert 200_000 < sizes[d] < 400_000 < sizes["shakespeare"]


# ---------------------------------------------------------------------------------------------------- corpus


def test_split_is_contiguous_at_a_line_boundary():
    for d in DOMAINS:
        text = load_text(d)
        train_text, val_text = split_text(text)
        assert train_text + val_text == text
        assert train_text.endswith("\n") and not val_text.startswith("\n")
        assert 0.08 < len(val_text) / len(text) < 0.12


def test_corpus_tokens_and_stats(tok, corpus):
    stats = corpus_stats()
    assert list(stats) == list(DOMAINS)
    for d in DOMAINS:
        assert stats[d]["train_tokens"] == corpus.train[d].numel() > 9 * corpus.val[d].numel() // 2
        assert stats[d]["train_chars"] + stats[d]["val_chars"] == len(load_text(d))
        assert corpus.train[d].dtype == torch.long
    joined = corpus.tokens("val")
    assert joined.numel() == sum(corpus.val[d].numel() for d in DOMAINS) + len(DOMAINS) - 1
    assert (joined == tok.eos_id).sum() == len(DOMAINS) - 1
    assert torch.equal(corpus.tokens("val", "code"), corpus.val["code"])
    one = load_corpus()  # default: Shakespeare only, from the in-process cache
    assert one.domains == ("shakespeare",) and torch.equal(one.train["shakespeare"], corpus.train["shakespeare"])


def test_data_dir_override_with_env(tmp_path, monkeypatch):
    _copy_data(tmp_path)
    (tmp_path / "arithmetic.txt").write_text("1 + 1 = 2\n" * 50 + "2 + 2 = 4\n" * 10)
    monkeypatch.setenv("DSV3_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    c = load_corpus("arithmetic")
    assert c.tokenizer.decode(c.val["arithmetic"]).startswith("2 + 2 = 4\n")


# ---------------------------------------------------------------------------------------------------- batching


def test_batch_shapes_and_label_shift():
    tokens = torch.arange(1000)  # a token's value is its position, so windows are easy to read
    batch = next(BatchIterator(tokens, batch_size=8, seq_len=32, seed=0))
    x, y = batch
    assert isinstance(batch, Batch) and x.shape == y.shape == (8, 32) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # labels[:, t] = tokens[start + t + 1]
    assert torch.equal(x, x[:, :1] + torch.arange(32))  # contiguous windows
    assert (x[:, 0] >= 0).all() and (y[:, -1] <= 999).all()
    assert batch.domains == ["tokens"] * 8


def test_windows_cover_the_stream_including_its_last_token():
    it = BatchIterator(torch.arange(20), batch_size=64, seq_len=4, seed=3)
    starts = torch.cat([next(it).input_ids[:, 0] for _ in range(20)])
    assert set(starts.tolist()) == set(range(16))  # every start 0..N-T-1, so token 19 is a label


def test_mixed_domains_never_cross_and_follow_weights():
    streams = {"a": torch.arange(0, 500), "b": torch.arange(10_000, 10_300), "c": torch.arange(20_000, 20_100)}
    it = BatchIterator(streams, batch_size=16, seq_len=10, seed=5)
    counts = torch.zeros(3)
    for _ in range(100):
        batch = next(it)
        x, y = batch
        assert torch.equal(y, x + 1)
        assert torch.equal(x[:, 0] // 10_000, batch.domain_ids)  # a row stays inside the domain it reports
        counts += torch.bincount(batch.domain_ids, minlength=3)
    share = counts / counts.sum()
    expected = torch.tensor([490.0, 290.0, 90.0]) / 870  # default: proportional to the number of windows
    assert torch.allclose(share, expected, atol=0.04)
    only_c = next(BatchIterator(streams, 16, 10, seed=5, weights={"c": 1.0}))
    assert only_c.domains == ["c"] * 16


def test_corpus_batches_report_their_domains(corpus):
    batch = next(corpus.batches(batch_size=6, seq_len=48, seed=1, weights={d: 1 for d in DOMAINS}))
    for row, domain in zip(batch.input_ids, batch.domains):  # each row is a window of the domain it names
        assert (corpus.train[domain].unfold(0, 48, 1) == row).all(1).any()


def test_exact_resume():
    streams = {"a": torch.arange(0, 5000), "b": torch.arange(10_000, 12_000)}
    first = BatchIterator(streams, batch_size=4, seq_len=16, seed=11)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # a plain-JSON position
    expected = [next(first) for _ in range(5)]
    resumed = BatchIterator(streams, batch_size=4, seq_len=16, seed=11)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(5))):
        assert torch.equal(want.input_ids, got.input_ids) and torch.equal(want.domain_ids, got.domain_ids)
    fresh = BatchIterator(streams, batch_size=4, seq_len=16, seed=11)
    assert not torch.equal(next(fresh).input_ids, expected[0].input_ids)  # the position matters
    assert not torch.equal(
        next(BatchIterator(streams, 4, 16, seed=12)).input_ids, next(BatchIterator(streams, 4, 16, seed=11)).input_ids
    )


def test_val_batches_are_fixed_non_overlapping_windows():
    streams = {"a": torch.arange(0, 100), "b": torch.arange(1000, 1050)}
    batches = val_batches(streams, batch_size=3, seq_len=8, max_batches=None)
    again = val_batches(streams, batch_size=3, seq_len=8)
    assert all(torch.equal(p.input_ids, q.input_ids) for p, q in zip(batches, again))
    starts = torch.cat([b.input_ids[:, 0] for b in batches]).tolist()
    # round-robin a, b, a, b, ...; a has 12 windows (0..88), b has 6 (1000..1040); 18 windows -> 6 batches of 3
    assert starts[:4] == [0, 1000, 8, 1008] and len(batches) == 6
    assert sorted(starts) == list(range(0, 89, 8)) + list(range(1000, 1041, 8))
    for b in batches:
        assert torch.equal(b.labels, b.input_ids + 1)
    assert len(val_batches(streams, 3, 8, max_batches=2)) == 2


def test_corpus_val_batches(corpus):
    batches = corpus.val_batches(batch_size=4, seq_len=64, max_batches=3)
    assert len(batches) == 3 and batches[0].domains == ["shakespeare", "arithmetic", "code", "shakespeare"]
    assert torch.equal(batches[0].input_ids[0], corpus.val["shakespeare"][:64])
    code_only = corpus.val_batches(batch_size=2, seq_len=64, domain="code")
    assert len(code_only) == (corpus.val["code"].numel() - 64 + 63) // 64 // 2
    assert set(code_only[-1].domains) == {"code"}


# ---------------------------------------------------------------------------------------------------- bad input


def test_missing_and_empty_files(tmp_path, tok):
    _copy_data(tmp_path)
    (tmp_path / "code.txt").unlink()
    with pytest.raises(FileNotFoundError, match="code.txt"):
        load_corpus("code", tok, directory=tmp_path)
    (tmp_path / "arithmetic.txt").write_text("  \n")
    with pytest.raises(ValueError, match="arithmetic.txt.*empty"):
        load_corpus("arithmetic", tok, directory=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        build_data_files(tmp_path / "missing-dir")


def test_data_dir_env_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV3_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="DSV3_DATA"):
        data.data_dir()


def test_unknown_domain_and_bad_split(corpus):
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        load_corpus(("shakespeare", "poetry"))
    with pytest.raises(ValueError, match="duplicates"):
        load_corpus(("code", "code"))
    with pytest.raises(ValueError, match="'test'"):
        corpus.tokens("test")
    with pytest.raises(ValueError, match="'poetry' is not in this corpus"):
        corpus.val_batches(2, 8, domain="poetry")
    with pytest.raises(ValueError, match="val_fraction"):
        split_text("a\nb\n", val_fraction=1.5)


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("batch_size", dict(batch_size=0)),
        ("batch_size", dict(batch_size=-2)),
        ("seq_len", dict(seq_len=0)),
        ("seq_len", dict(seq_len=2.5)),
        ("batch_size", dict(batch_size=True)),
    ],
)
def test_bad_batch_settings(field, kwargs):
    args = dict(batch_size=2, seq_len=4) | kwargs
    with pytest.raises(ValueError, match=f"{field} must be a positive integer, got {kwargs[field]!r}"):
        BatchIterator(torch.arange(100), **args)
    with pytest.raises(ValueError, match=field):
        val_batches(torch.arange(100), **args)


def test_seq_len_longer_than_the_split(corpus):
    n = corpus.val["code"].numel()
    with pytest.raises(ValueError, match=f"val split of 'code' has {n} tokens; seq_len \\+ 1 = {n + 1}"):
        corpus.batches(2, n, split="val")
    with pytest.raises(ValueError, match="'tokens' has 10 tokens; seq_len \\+ 1 = 11"):
        BatchIterator(torch.arange(10), 2, 10)
    with pytest.raises(ValueError, match="fewer than batch_size=5"):
        val_batches(torch.arange(40), batch_size=5, seq_len=8)


def test_bad_tokens_and_weights():
    with pytest.raises(ValueError, match="1-D integer tensor, got torch.float32"):
        BatchIterator(torch.zeros(100), 2, 4)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        BatchIterator(torch.zeros(2, 100, dtype=torch.long), 2, 4)
    with pytest.raises(ValueError, match="unknown domains \\['z'\\]"):
        BatchIterator({"a": torch.arange(100)}, 2, 4, weights={"z": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        BatchIterator({"a": torch.arange(100)}, 2, 4, weights={"a": -1.0})
    with pytest.raises(ValueError, match="not all zero"):
        BatchIterator({"a": torch.arange(100)}, 2, 4, weights={"a": 0.0})


def test_resume_with_different_settings_is_refused():
    state = BatchIterator(torch.arange(100), 2, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="batch_size=2.*batch_size=3"):
        BatchIterator(torch.arange(100), 3, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="lengths"):
        BatchIterator(torch.arange(101), 2, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="'step'"):
        BatchIterator(torch.arange(100), 2, 4, seed=0).load_state_dict({k: v for k, v in state.items() if k != "step"})


def test_generators_reject_bad_sizes():
    with pytest.raises(ValueError, match="n_lines must be a positive integer, got 0"):
        make_arithmetic(0)
    with pytest.raises(ValueError, match="n_snippets must be a positive integer, got -1"):
        make_code(-1)
    with pytest.raises(ValueError, match="vocab_size must be at least 258"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="fewer than vocab_size=4000"):
        train_tokenizer(["a tiny text"], vocab_size=4000)


# ---------------------------------------------------------------------------------------------------- packaging


@pytest.mark.slow
def test_wheel_ships_the_data_files_and_finds_them(tmp_path):
    """``pip install git+...`` on Colab builds a wheel: it must carry data/ (as dsv3/_data) and every module."""
    pytest.importorskip("setuptools")
    repo = Path(data.__file__).resolve().parent.parent
    src = tmp_path / "src"
    shutil.copytree(repo / "dsv3", src / "dsv3", ignore=shutil.ignore_patterns("__pycache__", "_data"))
    shutil.copytree(repo / "data", src / "data")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (repo / name).exists():
            shutil.copy(repo / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        timeout=600,
    )
    wheel = next((tmp_path / "dist").glob("dsv3-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in [*data.DOMAIN_FILES.values(), data.TOKENIZER_FILE]:
        assert f"dsv3/_data/{f}" in names, f"the wheel lacks data/{f}"
    for module in sorted((repo / "dsv3").rglob("*.py")):
        assert module.relative_to(repo).as_posix() in names, f"the wheel lacks {module.relative_to(repo)}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip does with a pure-Python wheel
    probe = (
        "import json, dsv3, dsv3.data as d; print(json.dumps([dsv3.__file__, str(d.data_dir()), "
        "d.load_tokenizer().vocab_size, d.load_text('code')]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "DSV3_DATA"}
    env["PYTHONPATH"] = str(site)  # the installed copy, ahead of this checkout
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=True
    ).stdout
    where, found, vocab, code = json.loads(out)
    assert Path(where) == site / "dsv3" / "__init__.py"
    assert Path(found) == site / "dsv3" / "_data"
    assert vocab == 2048 and code == load_text("code")
