"""The bundled corpus, its byte-level BPE tokenizer, and batching with an exact resume position.

Three domains that look nothing alike, so that the DeepSeekMoE chapter can show routed experts specializing:

- ``shakespeare``: Tiny Shakespeare (public domain), ``data/tinyshakespeare.txt``, about 1.1 MB of verse.
- ``arithmetic``: generated equations with every intermediate step, e.g. ``(12 + 7) * 3 = 19 * 3 = 57``.
- ``code``: generated Python functions, each followed by a call and the value it prints.

The generated domains come from seeded functions (``make_arithmetic``, ``make_code``) and are committed as text
files by ``build_data_files()``, which also trains the 2048-token byte-level BPE tokenizer (``<|bos|>`` = 0 and
``<|eos|>`` = 1, as in DeepSeek-V3) on all three. Everything is deterministic: rebuilding gives the same bytes.

Pre-training data in the paper (Sec. 4.1) is 14.8T tokens of a 128K-token byte-level BPE vocabulary; this is the
same recipe at teaching size. Training (``dsv3.train``) draws random windows with ``BatchIterator``, whose
``state_dict()`` is a step counter, so a resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_write_bytes

VOCAB_SIZE = 2048  # including the two special tokens
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>")  # ids 0 and 1, DeepSeek-V3's bos_token_id and eos_token_id
TOKENIZER_FILE = "tokenizer.json"
DOMAIN_FILES = {"shakespeare": "tinyshakespeare.txt", "arithmetic": "arithmetic.txt", "code": "code.txt"}
DOMAINS = tuple(DOMAIN_FILES)
ARITHMETIC_LINES, ARITHMETIC_SEED = 12000, 1234  # about 300 KB
CODE_SNIPPETS, CODE_SEED = 1900, 5678  # about 300 KB
VAL_FRACTION = 0.1  # the last 10% of every domain, cut at a blank line or line end


# ---------------------------------------------------------------------------------------------------------------
# Where the files are
# ---------------------------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """The folder holding the corpus and tokenizer.

    ``$DSV3_DATA`` when set; else ``dsv3/_data`` inside an installed package (a wheel maps the repository's
    ``data/`` there); else the repository's ``data/`` next to the ``dsv3`` folder.
    """
    env = os.environ.get("DSV3_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"DSV3_DATA={env!r} is not a directory")
        return path
    here = Path(__file__).resolve().parent
    packaged = here / "_data"
    return packaged if packaged.is_dir() else here.parent / "data"


def _resolve(directory: str | os.PathLike | None) -> Path:
    return data_dir() if directory is None else Path(directory)


def _read_text(path: Path) -> str:
    """A whole UTF-8 file, byte for byte (no newline translation); one clear error if missing or empty."""
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus file {str(path)!r} does not exist (set DSV3_DATA, or run dsv3.data.build_data_files())"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {str(path)!r} is not valid UTF-8: {e}") from None
    if not text.strip():
        raise ValueError(f"corpus file {str(path)!r} is empty")
    return text


def _check_domain(name: str) -> str:
    if name not in DOMAIN_FILES:
        raise ValueError(f"unknown domain {name!r}; known domains: {', '.join(DOMAINS)}")
    return name


def load_text(domain: str, directory: str | os.PathLike | None = None) -> str:
    """The raw text of one domain, read from its file in ``data_dir()`` (or ``directory``)."""
    return _read_text(_resolve(directory) / DOMAIN_FILES[_check_domain(domain)])


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Generated domains
# ---------------------------------------------------------------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _render(node, parent_prec: int = 0, right: bool = False) -> str:
    """An expression tree ``int | (op, left, right)`` as text with only the parentheses Python needs."""
    if isinstance(node, int):
        return f"({node})" if node < 0 and parent_prec else str(node)
    op, a, b = node
    text = f"{_render(a, _PREC[op])} {op} {_render(b, _PREC[op], right=True)}"
    needs = _PREC[op] < parent_prec or (right and _PREC[op] == parent_prec)
    return f"({text})" if needs else text


def _reduce_once(node):
    """Evaluate the leftmost operation whose operands are both numbers: one step of working."""
    op, a, b = node
    if isinstance(a, int) and isinstance(b, int):
        return _APPLY[op](a, b)
    if not isinstance(a, int):
        return (op, _reduce_once(a), b)
    return (op, a, _reduce_once(b))


def _random_tree(rng: random.Random, n_ops: int):
    """Grow an expression by replacing a random number with ``number op new_number`` (or the mirror) n_ops times."""
    tree = rng.randint(1, 99)

    def grow(node, target: int, counter: list[int]):
        if isinstance(node, int):
            if counter[0] == target:
                op = rng.choice("+-*")
                new = rng.randint(2, 12) if op == "*" else rng.randint(1, 99)
                counter[0] += 1
                return (op, node, new) if rng.random() < 0.5 else (op, new, node)
            counter[0] += 1
            return node
        op, a, b = node
        return (op, grow(a, target, counter), grow(b, target, counter))

    for i in range(n_ops):
        tree = grow(tree, rng.randint(0, i), [0])  # an expression with i ops has i + 1 numbers
    return tree


def _arithmetic_line(rng: random.Random) -> str:
    kind = rng.choices(("add", "sub", "mul", "div", "steps"), weights=(20, 15, 20, 10, 35))[0]
    if kind == "add":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"{a} + {b} = {a + b}"
    if kind == "sub":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"{a} - {b} = {a - b}"
    if kind == "mul":
        a, b = rng.randint(2, 99), rng.randint(2, 12 if rng.random() < 0.5 else 99)
        return f"{a} * {b} = {a * b}"
    if kind == "div":
        q, b = rng.randint(1, 99), rng.randint(2, 12)
        return f"{q * b} / {b} = {q}"
    tree = _random_tree(rng, rng.randint(2, 3))
    steps = [_render(tree)]
    while not isinstance(tree, int):
        tree = _reduce_once(tree)
        steps.append(str(tree) if isinstance(tree, int) else _render(tree))
    return " = ".join(steps)


def make_arithmetic(n_lines: int = ARITHMETIC_LINES, seed: int = ARITHMETIC_SEED) -> str:
    """``n_lines`` correct equations, one per line: sums, differences, products, exact quotients, and
    two- or three-operation expressions worked left to right one step at a time (``2 + 3 * 4 = 2 + 12 = 14``).

    Deterministic for a seed (Python's ``random.Random``); every side of every ``=`` evaluates to the same number.
    """
    _positive_int("n_lines", n_lines)
    rng = random.Random(seed)
    return "".join(_arithmetic_line(rng) + "\n" for _ in range(n_lines))


_NOUNS = (
    ("items", "item"),
    ("values", "value"),
    ("scores", "score"),
    ("prices", "price"),
    ("counts", "count"),
    ("sizes", "size"),
    ("ages", "age"),
    ("weights", "weight"),
    ("points", "point"),
    ("levels", "level"),
    ("nums", "n"),
    ("xs", "x"),
    ("data", "d"),
    ("marks", "mark"),
    ("steps", "step"),
)
_WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "maple",
    "ember",
    "frost",
    "lemon",
    "piano",
    "coral",
    "orbit",
    "pixel",
    "raven",
    "sugar",
    "tulip",
    "violet",
    "walnut",
    "yarn",
    "zebra",
    "amber",
    "cedar",
    "delta",
    "eagle",
)
_CLASSES = (
    ("Counter", "counter"),
    ("Account", "account"),
    ("Meter", "meter"),
    ("Tank", "tank"),
    ("Score", "score"),
    ("Budget", "budget"),
    ("Timer", "timer"),
    ("Stack", "stack"),
)


def _ints(rng: random.Random, lo: int = 0, hi: int = 50) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(3, 7))]


def _code_snippet(rng: random.Random) -> str:
    """One small Python program: a function, a call, and ``# -> `` followed by exactly what the call prints.

    The printed value is computed here by plain Python, independently of the program text, so a test can run the
    program and compare.
    """
    xs, x = rng.choice(_NOUNS)
    kind = rng.randrange(12)
    if kind == 0:
        acc, vals = rng.choice(("total", "acc", "result", "s")), _ints(rng)
        fn = rng.choice((f"sum_{xs}", f"total_{xs}", "add_all"))
        body = (
            f"def {fn}({xs}):\n    {acc} = 0\n    for {x} in {xs}:\n        {acc} += {x}\n    return {acc}\n",
            f"{fn}({vals})",
            sum(vals),
        )
    elif kind == 1:
        op, name = rng.choice(
            ((">", "above"), ("<", "below"), (">=", "at_least"), ("<=", "at_most"), ("==", "equal_to"))
        )
        vals, limit = _ints(rng, 0, 20), rng.randint(0, 20)
        test = {">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le, "==": operator.eq}[op]
        body = (
            f"def count_{name}({xs}, limit):\n    hits = 0\n    for {x} in {xs}:\n        if {x} {op} limit:\n"
            f"            hits += 1\n    return hits\n",
            f"count_{name}({vals}, {limit})",
            sum(test(v, limit) for v in vals),
        )
    elif kind == 2:
        fn, op, pick = rng.choice((("largest", ">", max), ("smallest", "<", min)))
        vals = _ints(rng, -30, 90)
        body = (
            f"def {fn}({xs}):\n    best = {xs}[0]\n    for {x} in {xs}[1:]:\n        if {x} {op} best:\n"
            f"            best = {x}\n    return best\n",
            f"{fn}({vals})",
            pick(vals),
        )
    elif kind == 3:
        k, m, vals = rng.randint(2, 9), rng.randint(2, 5), _ints(rng, 0, 30)
        fn = rng.choice((f"scale_{xs}", "pick_and_scale", f"select_{xs}"))
        body = (
            f"def {fn}({xs}):\n    return [{x} * {k} for {x} in {xs} if {x} % {m} == 0]\n",
            f"{fn}({vals})",
            [v * k for v in vals if v % m == 0],
        )
    elif kind == 4:
        n0 = rng.randint(2, 40)
        n, count = n0, 0
        while n != 1:
            n, count = (n // 2 if n % 2 == 0 else 3 * n + 1), count + 1
        var = rng.choice(("n", "k", "value"))
        body = (
            f"def steps_to_one({var}):\n    count = 0\n    while {var} != 1:\n        if {var} % 2 == 0:\n"
            f"            {var} = {var} // 2\n        else:\n            {var} = 3 * {var} + 1\n"
            f"        count += 1\n    return count\n",
            f"steps_to_one({n0})",
            count,
        )
    elif kind == 5:
        word, k = rng.choice(_WORDS), rng.randint(1, 4)
        method, out = rng.choice((("upper()", word.upper()), ("title()", word.title()), ("lower()", word)))
        fn = rng.choice(("shout", "emphasize", "exclaim"))
        body = (f'def {fn}(word):\n    return word.{method} + "!" * {k}\n', f'{fn}("{word}")', out + "!" * k)
    elif kind == 6:
        words = [rng.choice(_WORDS[: rng.randint(2, 6)]) for _ in range(rng.randint(3, 7))]
        counts: dict[str, int] = {}
        for w in words:
            counts[w] = counts.get(w, 0) + 1
        body = (
            "def tally(words):\n    counts = {}\n    for w in words:\n        counts[w] = counts.get(w, 0) + 1\n"
            "    return counts\n",
            f"tally({words})",
            counts,
        )
    elif kind == 7:
        cls, obj = rng.choice(_CLASSES)
        op, meth = rng.choice((("+", "add"), ("-", "take"), ("*", "scale")))
        start, b, c = rng.randint(0, 50), rng.randint(1, 9), rng.randint(1, 9)
        value = _APPLY[op](_APPLY[op](start, b), c)
        return (
            f"class {cls}:\n    def __init__(self, start):\n        self.value = start\n\n"
            f"    def {meth}(self, k):\n        self.value {op}= k\n        return self.value\n\n\n"
            f"{obj} = {cls}({start})\n{obj}.{meth}({b})\nprint({obj}.{meth}({c}))  # -> {value}\n"
        )
    elif kind == 8:
        n = rng.randint(0, 10)
        body = (
            "def factorial(n):\n    if n <= 1:\n        return 1\n    return n * factorial(n - 1)\n",
            f"factorial({n})",
            math.factorial(n),
        )
    elif kind == 9:
        k, vals = rng.randint(1, 3), _ints(rng)
        body = (
            f"def top_{k}({xs}):\n    return sorted({xs}, reverse=True)[:{k}]\n",
            f"top_{k}({vals})",
            sorted(vals, reverse=True)[:k],
        )
    elif kind == 10:
        a = _ints(rng, -9, 9)
        b = [rng.randint(-9, 9) for _ in a]
        body = (
            "def dot(a, b):\n    return sum(x * y for x, y in zip(a, b))\n",
            f"dot({a}, {b})",
            sum(p * q for p, q in zip(a, b)),
        )
    else:
        words = rng.sample(_WORDS, rng.randint(2, 5))
        body = (
            'def initials(words):\n    return "".join(w[0].upper() for w in words)\n',
            f"initials({words})",
            "".join(w[0].upper() for w in words),
        )
    definition, call, value = body
    return f"{definition}\n\nprint({call})  # -> {value}\n"


def make_code(n_snippets: int = CODE_SNIPPETS, seed: int = CODE_SEED) -> str:
    """``n_snippets`` small Python programs separated by two blank lines (PEP 8), each ending with
    ``print(...)  # -> <what it prints>``. The whole text is one valid Python file. Deterministic for a seed."""
    _positive_int("n_snippets", n_snippets)
    rng = random.Random(seed)
    return "\n\n".join(_code_snippet(rng) for _ in range(n_snippets))


def generate_domain(domain: str) -> str:
    """The committed text of a generated domain, rebuilt from its seed."""
    if domain == "arithmetic":
        return make_arithmetic(ARITHMETIC_LINES, ARITHMETIC_SEED)
    if domain == "code":
        return make_code(CODE_SNIPPETS, CODE_SEED)
    raise ValueError(f"domain {_check_domain(domain)!r} is a file, not generated")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE) -> str:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer, all 256 bytes in the base alphabet) on ``texts`` and
    return the ``tokenizer.json`` text. Ids 0 and 1 are ``<|bos|>`` and ``<|eos|>``; the rest are merges.

    Deterministic: the trainer breaks count ties by the pair itself, so threads and runs give identical files.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    _positive_int("vocab_size", vocab_size)
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}"
        )
    if not any(t.strip() for t in texts):
        raise ValueError("train_tokenizer got no text")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus only supports {tok.get_vocab_size()} tokens, fewer than vocab_size={vocab_size}")
    return tok.to_str(pretty=True)


class Tokenizer:
    """The bundled byte-level BPE: ``encode(text) -> list[int]``, ``decode(ids) -> str``, and the special ids.

    Byte-level means every string round-trips: ``decode(encode(s)) == s``. Text that happens to contain
    ``<|eos|>`` is encoded as ordinary bytes; only the data pipeline inserts the special ids.
    """

    def __init__(self, json_text: str, source: str = "<memory>"):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.backend = HFTokenizer.from_str(json_text)
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise ValueError(f"tokenizer file {source!r} is not a valid tokenizer.json: {e}") from None
        self.source = source
        self.backend.encode_special_tokens = True  # "<|eos|>" inside raw text stays text
        ids = [self.backend.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != [0, 1]:
            raise ValueError(
                f"tokenizer {source!r} must have {SPECIAL_TOKENS[0]}=0 and {SPECIAL_TOKENS[1]}=1, got ids {ids}"
            )
        self.bos_id, self.eos_id = ids
        self.vocab_size = self.backend.get_vocab_size()
        self.fingerprint = hashlib.sha1(json_text.encode()).hexdigest()  # keys the token cache

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def pieces(self, text: str) -> list[str]:
        """The text of each token of ``text`` (a byte piece of a multi-byte character shows as U+FFFD)."""
        return [self.decode([i]) for i in self.encode(text)]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"source={self.source!r})"
        )


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer at ``path`` (default: ``tokenizer.json`` in ``data_dir()``)."""
    path = data_dir() / TOKENIZER_FILE if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist (run dsv3.data.build_data_files())")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"tokenizer file {str(path)!r} is not valid UTF-8: {e}") from None
    return Tokenizer(text, source=str(path))


def build_data_files(
    directory: str | os.PathLike | None = None, shakespeare: str | os.PathLike | None = None
) -> dict[str, Path]:
    """(Re)write the bundled files: the generated domains from their seeds and the tokenizer trained on all domains.

    ``tinyshakespeare.txt`` must already be in ``directory`` (default ``data_dir()``), or is copied from
    ``shakespeare``. Each file is written atomically. Running it on a checkout reproduces the committed bytes.
    """
    out = _resolve(directory)
    if shakespeare is not None:
        atomic_write_bytes(out / DOMAIN_FILES["shakespeare"], _read_text(Path(shakespeare)).encode("utf-8"))
    texts = {"shakespeare": _read_text(out / DOMAIN_FILES["shakespeare"])}
    written = {"shakespeare": out / DOMAIN_FILES["shakespeare"]}
    for domain in ("arithmetic", "code"):
        texts[domain] = generate_domain(domain)
        written[domain] = out / DOMAIN_FILES[domain]
        atomic_write_bytes(written[domain], texts[domain].encode("utf-8"))
    written["tokenizer"] = out / TOKENIZER_FILE
    atomic_write_bytes(written["tokenizer"], train_tokenizer([texts[d] for d in DOMAINS]).encode("utf-8"))
    return written  # the token cache is keyed by file size, mtime and tokenizer hash, so it never goes stale


# ---------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------


def split_text(text: str, val_fraction: float = VAL_FRACTION, name: str = "text") -> tuple[str, str]:
    """Contiguous train/val split: val is the last ``val_fraction`` of the characters, moved back to start after a
    blank line (or else a line end), so no document straddles the cut. ``train + val == text``."""
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    target = int(len(text) * (1 - val_fraction))
    cut = text.rfind("\n\n", 0, target) + 2
    if cut < 2 or cut < target * (1 - val_fraction):  # no blank line reasonably near: cut at a line end
        cut = text.rfind("\n", 0, target) + 1 or target
    while cut < len(text) and text[cut] == "\n":  # a run of blank lines stays with train
        cut += 1
    if not 0 < cut < len(text):
        raise ValueError(f"{name} ({len(text)} characters) is too short to split with val_fraction={val_fraction}")
    return text[:cut], text[cut:]


_TOKEN_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, int, int]] = {}


def _domain_tokens(domain: str, tokenizer: Tokenizer, directory: Path, val_fraction: float):
    """(train ids, val ids, train chars, val chars) of one domain, tokenized once per process."""
    path = directory / DOMAIN_FILES[domain]
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat and (stat.st_size, stat.st_mtime_ns), tokenizer.fingerprint, val_fraction)
    if key not in _TOKEN_CACHE:
        train_text, val_text = split_text(_read_text(path), val_fraction, name=f"corpus file {str(path)!r}")
        _TOKEN_CACHE[key] = (
            torch.tensor(tokenizer.encode(train_text), dtype=torch.long),  # (N_train,)
            torch.tensor(tokenizer.encode(val_text), dtype=torch.long),  # (N_val,)
            len(train_text),
            len(val_text),
        )
    return _TOKEN_CACHE[key]


@dataclass
class Batch:
    """One training batch. Unpacks as ``input_ids, labels = batch``; ``labels[:, t]`` is the token after
    ``input_ids[:, t]``. ``domain_ids[b]`` indexes ``domain_names``: which domain row b was drawn from."""

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    domain_ids: torch.Tensor  # (B,)
    domain_names: tuple[str, ...]

    def __iter__(self):
        return iter((self.input_ids, self.labels))

    @property
    def domains(self) -> list[str]:
        """The domain name of every row."""
        return [self.domain_names[i] for i in self.domain_ids.tolist()]

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.domain_ids.to(device), self.domain_names)


def _as_streams(tokens: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    streams = {"tokens": tokens} if isinstance(tokens, torch.Tensor) else dict(tokens)
    if not streams:
        raise ValueError("no token streams given")
    for name, t in streams.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tokens of {name!r} must be a 1-D integer tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"tokens of {name!r} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    return {name: t.long() for name, t in streams.items()}


def _check_length(streams: Mapping[str, torch.Tensor], seq_len: int, split: str = "") -> None:
    for name, t in streams.items():
        if t.numel() < seq_len + 1:
            where = f"{split} split of {name!r}" if split else repr(name)
            raise ValueError(f"the {where} has {t.numel()} tokens; seq_len + 1 = {seq_len + 1} are needed")


def _mix_seed(seed: int, step: int) -> int:
    """SplitMix64 of (seed, step): an independent generator seed for every step, so the position is one integer."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mul) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class BatchIterator:
    """Random windows of ``seq_len + 1`` tokens, as in nanoGPT, from one token stream or several domains.

    ``tokens`` is a 1-D LongTensor or a mapping ``domain -> 1-D LongTensor``. Each row first picks a domain
    (probability ``weights[domain]``; default proportional to the number of windows it has), then a uniform start.
    A window never crosses from one domain into another. Batch ``k`` depends only on ``(seed, k)``: its rows come
    from a ``torch.Generator`` seeded with a hash of both. ``state_dict()`` is therefore just the step counter
    (plus the shape it must match), and a loaded iterator continues with exactly the batches the original would
    have produced.
    """

    def __init__(
        self,
        tokens: torch.Tensor | Mapping[str, torch.Tensor],
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
    ):
        self.batch_size = _positive_int("batch_size", batch_size)
        self.seq_len = _positive_int("seq_len", seq_len)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed, self.step = seed, 0
        streams = _as_streams(tokens)
        _check_length(streams, seq_len)
        self.domain_names = tuple(streams)
        self.lengths = [t.numel() for t in streams.values()]
        self.n_starts = torch.tensor([n - seq_len for n in self.lengths], dtype=torch.float64)  # (D,)
        self.weights = self._weights(weights)  # (D,), sums to 1
        self._flat = torch.cat(list(streams.values()))  # (sum N,)
        self._offsets = torch.tensor([0] + self.lengths[:-1]).cumsum(0)  # (D,) where each domain starts

    def _weights(self, weights: Mapping[str, float] | None) -> torch.Tensor:
        if weights is None:
            w = self.n_starts.clone()
        else:
            if not isinstance(weights, Mapping):
                raise ValueError(f"weights must map domain names to numbers, got {type(weights).__name__}")
            unknown = set(weights) - set(self.domain_names)
            if unknown:
                raise ValueError(f"weights name unknown domains {sorted(unknown)}; domains: {list(self.domain_names)}")
            w = torch.tensor([float(weights.get(d, 0.0)) for d in self.domain_names], dtype=torch.float64)
            if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"weights must be finite, non-negative and not all zero, got {dict(weights)}")
        return w / w.sum()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        B, T = self.batch_size, self.seq_len
        g = torch.Generator().manual_seed(_mix_seed(self.seed, self.step))
        rows = torch.multinomial(self.weights, B, replacement=True, generator=g)  # (B,) domain of each row
        u = torch.rand(B, generator=g, dtype=torch.float64)  # (B,)
        starts = (u * self.n_starts[rows]).long()  # (B,) in [0, N_d - T)
        index = (self._offsets[rows] + starts)[:, None] + torch.arange(T + 1)  # (B, T + 1)
        window = self._flat[index]  # (B, T + 1)
        self.step += 1
        return Batch(window[:, :-1], window[:, 1:], rows, self.domain_names)  # (B, T), (B, T)

    def state_dict(self) -> dict:
        """The exact position: the step counter and the seed, with the settings a resumed iterator must share."""
        return {
            "seed": self.seed,
            "step": self.step,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "domains": list(self.domain_names),
            "lengths": list(self.lengths),
            "weights": [round(w, 12) for w in self.weights.tolist()],
        }

    def load_state_dict(self, state: Mapping) -> None:
        mine = self.state_dict()
        for key in ("seed", "step"):
            if not isinstance(state.get(key), int) or isinstance(state.get(key), bool):
                raise ValueError(f"batch iterator state needs an integer {key!r}, got {state.get(key)!r}")
        for key in ("batch_size", "seq_len", "domains", "lengths", "weights"):
            if key not in state:
                raise ValueError(f"batch iterator state has no {key!r}")
            if _normalize(state[key]) != _normalize(mine[key]):
                raise ValueError(
                    f"batch iterator state was saved with {key}={state[key]!r}, but this iterator has "
                    f"{key}={mine[key]!r}"
                )
        self.seed, self.step = state["seed"], state["step"]


def _normalize(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def val_batches(
    tokens: torch.Tensor | Mapping[str, torch.Tensor], batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[Batch]:
    """Fixed, non-overlapping windows (inputs at ``0, T, 2T, ...``) of every stream, taken round-robin across
    domains so each batch mixes them, in batches of ``batch_size`` (an incomplete last batch is dropped).
    The same arguments always give the same batches: validation losses are comparable across runs."""
    _positive_int("batch_size", batch_size)
    _positive_int("seq_len", seq_len)
    if max_batches is not None:
        _positive_int("max_batches", max_batches)
    streams = _as_streams(tokens)
    _check_length(streams, seq_len, split="validation")
    names = tuple(streams)
    per_domain = [[(d, s) for s in range(0, t.numel() - seq_len, seq_len)] for d, t in enumerate(streams.values())]
    order = _interleave(per_domain)  # [(domain index, start), ...]
    n_batches = len(order) // batch_size
    if n_batches == 0:
        raise ValueError(
            f"validation split has {len(order)} windows of seq_len={seq_len}, fewer than batch_size={batch_size}"
        )
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    flat = list(streams.values())
    batches = []
    for b in range(n_batches):
        chosen = order[b * batch_size : (b + 1) * batch_size]
        window = torch.stack([flat[d][s : s + seq_len + 1] for d, s in chosen])  # (B, T + 1)
        rows = torch.tensor([d for d, _ in chosen])  # (B,)
        batches.append(Batch(window[:, :-1], window[:, 1:], rows, names))
    return batches


def _interleave(groups: list[list]) -> list:
    """[a0, a1], [b0, b1, b2] -> [a0, b0, a1, b1, b2]."""
    out = []
    for i in range(max(len(g) for g in groups)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


@dataclass
class Corpus:
    """Token ids of each domain's train and val split (1-D LongTensors), with the tokenizer that made them."""

    tokenizer: Tokenizer
    domains: tuple[str, ...]
    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    chars: dict[str, dict[str, int]]  # domain -> {"train": n, "val": n}

    def _split(self, split: str) -> dict[str, torch.Tensor]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def _domain(self, domain: str) -> str:
        if domain not in self.domains:
            raise ValueError(f"domain {domain!r} is not in this corpus; it holds {', '.join(self.domains)}")
        return domain

    def tokens(self, split: str = "train", domain: str | None = None) -> torch.Tensor:
        """One domain's ids, or all domains concatenated with ``<|eos|>`` between them."""
        streams = self._split(split)
        if domain is not None:
            return streams[self._domain(domain)]
        eos = torch.tensor([self.tokenizer.eos_id])
        parts = [p for d in self.domains for p in (streams[d], eos)][:-1]
        return torch.cat(parts)  # (N,)

    def batches(
        self,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        split: str = "train",
        weights: Mapping[str, float] | None = None,
    ) -> BatchIterator:
        """Endless random batches over all domains of ``split`` (see ``BatchIterator``)."""
        streams = self._split(split)
        _positive_int("batch_size", batch_size)
        _check_length(streams, _positive_int("seq_len", seq_len), split=split)
        return BatchIterator(streams, batch_size, seq_len, seed=seed, weights=weights)

    def val_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None, domain: str | None = None
    ) -> list[Batch]:
        """Fixed validation batches (see ``val_batches``), over all domains or one."""
        streams = self.val if domain is None else {self._domain(domain): self.val[domain]}
        return val_batches(streams, batch_size, seq_len, max_batches)

    def stats(self) -> dict[str, dict[str, float]]:
        """Characters and tokens of every domain and split, and characters per token."""
        out = {}
        for d in self.domains:
            row = {
                "train_chars": self.chars[d]["train"],
                "val_chars": self.chars[d]["val"],
                "train_tokens": self.train[d].numel(),
                "val_tokens": self.val[d].numel(),
            }
            row["chars_per_token"] = round(
                (row["train_chars"] + row["val_chars"]) / (row["train_tokens"] + row["val_tokens"]), 3
            )
            out[d] = row
        return out


def load_corpus(
    domains: Sequence[str] | str = ("shakespeare",),
    tokenizer: Tokenizer | None = None,
    val_fraction: float = VAL_FRACTION,
    directory: str | os.PathLike | None = None,
) -> Corpus:
    """Tokenize the named domains (cached per process) and split each into train and val.

    ``domains`` is a name or a sequence of names from ``DOMAINS``; ``tokenizer`` defaults to ``load_tokenizer()``
    from the same folder.
    """
    names = (domains,) if isinstance(domains, str) else tuple(domains)
    if not names:
        raise ValueError("domains is empty; choose from " + ", ".join(DOMAINS))
    if len(set(names)) != len(names):
        raise ValueError(f"domains has duplicates: {list(names)}")
    for d in names:
        _check_domain(d)
    folder = _resolve(directory)
    tok = tokenizer if tokenizer is not None else load_tokenizer(folder / TOKENIZER_FILE)
    train, val, chars = {}, {}, {}
    for d in names:
        tr, va, n_tr, n_va = _domain_tokens(d, tok, folder, val_fraction)
        train[d], val[d], chars[d] = tr.clone(), va.clone(), {"train": n_tr, "val": n_va}
    return Corpus(tok, names, train, val, chars)


def corpus_stats(
    domains: Sequence[str] = DOMAINS, tokenizer: Tokenizer | None = None, directory: str | os.PathLike | None = None
) -> dict[str, dict[str, float]]:
    """Characters and tokens per domain and split of the bundled corpus (the table the training chapter prints)."""
    return load_corpus(domains, tokenizer, directory=directory).stats()
