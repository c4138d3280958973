"""Text data for language models: real English sentences that ship with skd's own dependencies, and a
one-example-per-line text-file dataset.

Two disjoint sets from different sources, so calibration never sees the evaluation text:

- CALIBRATION: scikit-learn's documentation as installed (scikit-learn is a dependency of skd): its
  dataset descriptions (`sklearn/datasets/descr/*.rst`) and the docstrings of its modules, classes and
  functions (read from the sources with `ast`, nothing imported; tests excluded) — prose about data sets,
  estimators and statistics. Several thousand sentences.
- EVALUATION: Python's own reference manual topics (`pydoc_data.topics`, part of every CPython install)
  — prose about the Python language. Several thousand sentences.

Sentences are cut from prose paragraphs only (reStructuredText markup, literal/code blocks, tables and
headings are dropped) by `split_sentences`, and deduplicated across both sets.

Batches are dicts of tensors (`input_ids`, `attention_mask`, `token_type_ids` when the tokenizer makes
them), as a HuggingFace model takes them; padding tokens have attention_mask 0.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

MIN_WORDS, MAX_WORDS = 5, 40  # shorter fragments are headings/captions; longer ones are run-ons or lists

_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`~a.b` / :ref:`text <target>` -> text
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_{1,2}")  # `text <url>`__ -> text
_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`")
_EMPHASIS = re.compile(r"\*{1,2}([^*]+)\*{1,2}")
_CITATION = re.compile(r"\[[^\]]*\]_?|\(\s*\)")
# A sentence ends at . ! ? (optionally closed by a quote/bracket) followed by whitespace and a capital,
# a digit or an opening quote; "e.g." / "i.e." / "etc." / initials do not end one.
_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)(?<!\b[A-Z])([.!?][\"')\]]?)\s+(?=[A-Z0-9\"'(])")
_NOT_PROSE = re.compile(r"^\s*(\.\.|[=\-~*^#+|]{3,}|>>>|\.\.\.|[-*+] |\d+\. |:\w+:)")


def split_sentences(text: str) -> list[str]:
    """English sentences of the prose paragraphs of a reStructuredText/plain-text document.

    Paragraphs are blank-line separated; indented paragraphs (literal and code blocks), directives,
    tables, headings and list items are skipped, inline markup is reduced to its text. Sentences of
    MIN_WORDS..MAX_WORDS words that are mostly letters are kept, in document order.
    """
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if not para.strip() or lines[0][:1].isspace() or any(_NOT_PROSE.match(line) for line in lines):
            continue
        if len(lines) > 1 and lines[1].strip() and set(lines[1].strip()) <= set("=-~*^#+"):
            lines = lines[2:]  # a heading underline
        flat = " ".join(line.strip() for line in lines)
        flat = _ROLE.sub(r"\1", flat)
        flat = _LINK.sub(r"\1", flat)
        flat = _LITERAL.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), flat)
        flat = _EMPHASIS.sub(r"\1", flat)
        flat = re.sub(r"\s+", " ", _CITATION.sub("", flat)).strip()
        for sentence in _END.sub(r"\1\n", flat).split("\n"):
            sentence = sentence.strip()
            if _is_sentence(sentence):
                out.append(sentence)
    return out


def _is_sentence(s: str) -> bool:
    words = s.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or not s[0].isupper() or s[-1] not in ".!?":
        return False
    visible = s.replace(" ", "")
    return sum(c.isalpha() for c in visible) >= 0.8 * len(visible) and "::" not in s


@cache
def _sources() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(calibration, evaluation) sentences, each deduplicated and disjoint from the other."""
    import pydoc_data.topics

    import sklearn

    root = Path(sklearn.__file__).parent
    docs = [f.read_text("utf-8") for f in sorted((root / "datasets" / "descr").glob("*.rst"))]
    docs += _docstrings(f for f in sorted(root.rglob("*.py")) if not {"tests", "externals"} & set(f.parts))
    calibration = _unique(s for doc in docs for s in split_sentences(doc))
    seen = set(calibration)
    topics = pydoc_data.topics.topics
    evaluation = _unique(s for key in sorted(topics) for s in split_sentences(topics[key]) if s not in seen)
    return tuple(calibration), tuple(evaluation)


def _docstrings(files: Any) -> list[str]:
    """The docstrings of every module, class and function in the Python source files, in file order."""
    out = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text("utf-8"))):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    return out


def _unique(sentences: Any) -> list[str]:
    return list(dict.fromkeys(sentences))


def calibration_sentences() -> list[str]:
    """English sentences from scikit-learn's documentation (thousands), for WPAC calibration."""
    return list(_sources()[0])


def evaluation_sentences() -> list[str]:
    """English sentences from Python's reference manual topics (pydoc_data; > 1000), disjoint from
    `calibration_sentences()`, for held-out evaluation."""
    return list(_sources()[1])


def read_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; ValueError naming the file when it is not
    UTF-8 or holds no example, FileNotFoundError when it does not exist."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no examples (the file is empty or only blank lines; one example per line)")
    return lines


def length_batches(texts: Sequence[str], tokenizer: Any, max_length: int = 128,
                   batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """The texts as dict batches of similar length, each padded only to its own longest example (far
    less padding than one global length: cheaper evaluation). The texts are reordered by token count
    (stable), so results are comparable between models given the same batches, not with `texts`' order."""
    if not texts:
        raise ValueError("length_batches needs at least one text")
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start : start + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
    return out


class TextDataset(Dataset):
    """Tokenised sentences, one example per sentence, all padded to one length.

    texts: the sentences (or `TextDataset.from_file` for a one-per-line file). tokenizer: a HuggingFace
    tokenizer (e.g. `AutoTokenizer.from_pretrained(folder)`). max_length: longer examples are truncated.
    Every example is padded to the longest one (at most max_length), so the default DataLoader collation
    stacks them; padding tokens have attention_mask 0 and carry no weight anywhere in skd.
    Item i: dict of int64 tensors (L,): input_ids, attention_mask (and token_type_ids if the tokenizer
    makes them).
    """

    def __init__(self, texts: Sequence[str], tokenizer: Any, max_length: int = 128) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r} must be an int >= 2 (room for the special tokens)")
        if not texts:
            raise ValueError("TextDataset needs at least one text")
        self.texts = list(texts)
        enc = tokenizer(self.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        self.encoding = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Any, max_length: int = 128) -> TextDataset:
        """One example per non-blank line of a UTF-8 file (errors as `read_lines`)."""
        return cls(read_lines(path), tokenizer, max_length)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.encoding.items()}
