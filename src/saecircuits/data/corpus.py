"""Read a text corpus into a list of documents (stories).

Accepted inputs (the reference notebook read the TinyStories validation parquet's ``text`` column; TinyStories is also
published as ``<|endoftext|>``-separated text files):

- plain text (``.txt`` or any other suffix not below): split on lines that are exactly ``<|endoftext|>`` (surrounding
  whitespace ignored) when the file has such a separator, otherwise on blank lines (one or more empty lines);
- JSON Lines (``.jsonl``): one object per line with a string ``text`` field;
- Parquet (``.parquet``): a ``text`` column (read with pyarrow; null rows are skipped);
- a folder holding exactly one such file.

Every document is stripped of surrounding whitespace and empty documents are dropped; inner newlines (paragraphs)
are kept. Order is file order.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

EOT = "<|endoftext|>"
_EOT_SPLIT = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.MULTILINE)
_BLANK_SPLIT = re.compile(r"\n[ \t]*\n")
_SUFFIXES = {".txt", ".text", ".jsonl", ".parquet"}


class CorpusError(ValueError):
    """A corpus file cannot be read as documents (no text column, invalid JSON line, no documents, ambiguous folder)."""


def _clean(docs: list[str]) -> list[str]:
    return [d.strip() for d in docs if d and d.strip()]


def _split_text(text: str) -> list[str]:
    text = text.replace("\r\n", "\n")
    if EOT in text:
        if _EOT_SPLIT.search(text):
            return _EOT_SPLIT.split(text)
        return text.split(EOT)  # separator not on its own line (e.g. "story<|endoftext|>story")
    return _BLANK_SPLIT.split(text)


def _read_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line"
                ) from exc
            if not isinstance(row, dict) or "text" not in row:
                raise CorpusError(
                    f"{path}:{lineno}: no 'text' field; each JSONL line must be an object with 'text'"
                )
            if not isinstance(row["text"], str):
                raise CorpusError(
                    f"{path}:{lineno}: 'text' is {type(row['text']).__name__}, expected a string"
                )
            docs.append(row["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    """The ``text`` column's strings, null rows skipped.

    Raises:
        CorpusError: not a readable Parquet file (pyarrow's reason), no ``text`` column, or a ``text`` column that
            does not hold strings (it was read as "no non-empty documents").
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise CorpusError(f"{path} has no 'text' column (columns: {schema.names}); rename the text column to "
                              "'text'")
        kind = schema.field("text").type
        is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
            raise CorpusError(f"{path}: the 'text' column holds {kind}, expected strings; write the documents' text "
                              "as a string column")
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{path} cannot be read as Parquet ({err}); the file is truncated or not Parquet: give "
                          "a text, .jsonl or .parquet corpus") from err
    return [t for t in texts if isinstance(t, str)]


def read_documents(path: str | os.PathLike[str]) -> list[str]:
    """Read the documents of a corpus file (or a folder holding exactly one corpus file).

    Args:
        path: ``.txt``-like file, ``.jsonl`` file, ``.parquet`` file, or a folder with exactly one of them.

    Returns:
        the documents, stripped, non-empty, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorpusError: a folder with zero or several corpus files, a text file that is not UTF-8, a JSONL line
            without a string ``text``, a parquet file that cannot be read or has no string ``text`` column, or no
            non-empty document at all.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"corpus not found: {p}")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _SUFFIXES)
        if len(files) != 1:
            found = ", ".join(f.name for f in files) or "none"
            raise CorpusError(
                f"{p} must hold exactly one corpus file ({', '.join(sorted(_SUFFIXES))}); found: {found}. "
                "Pass the file path instead."
            )
        p = files[0]
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        docs = _read_jsonl(p)
    elif suffix == ".parquet":
        docs = _read_parquet(p)
    else:
        try:
            docs = _split_text(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start}); give a text, .jsonl or "
                              ".parquet corpus") from exc
    docs = _clean(docs)
    if not docs:
        raise CorpusError(f"{p} contains no non-empty documents")
    return docs
