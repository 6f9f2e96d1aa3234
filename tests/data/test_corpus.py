"""read_documents: text (<|endoftext|> or blank-line separated), JSONL, Parquet, folders, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saecircuits.data.corpus import CorpusError, read_documents

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_eot_separated_text_keeps_paragraphs(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(
        "  First story.\n\nSecond paragraph.\n<|endoftext|>\nSecond story.\n<|endoftext|>\n\n<|endoftext|>\n"
    )
    assert read_documents(f) == ["First story.\n\nSecond paragraph.", "Second story."]


def test_inline_eot_separator(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("one<|endoftext|>two<|endoftext|>")
    assert read_documents(f) == ["one", "two"]


def test_blank_line_separated_text(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a b\nc\n\n\n  \nd e\r\n\r\nf\n")
    assert read_documents(f) == ["a b\nc", "d e", "f"]


def test_jsonl(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(
        "\n".join(json.dumps(r) for r in [{"text": " x ", "id": 1}, {"text": ""}, {"text": "y\n\nz"}])
        + "\n\n"
    )
    assert read_documents(f) == ["x", "y\n\nz"]


def test_jsonl_errors(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:2: no 'text' field"):
        read_documents(f)
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match=r":2: not valid JSON"):
        read_documents(f)
    f.write_text('{"text": 3}\n')
    with pytest.raises(CorpusError, match="expected a string"):
        read_documents(f)


def test_parquet_and_missing_column(tmp_path):
    import pandas as pd

    f = tmp_path / "c.parquet"
    pd.DataFrame({"text": ["  a  ", None, "b", " "], "n": [1, 2, 3, 4]}).to_parquet(f)
    assert read_documents(f) == ["a", "b"]
    g = tmp_path / "d.parquet"
    pd.DataFrame({"story": ["a"]}).to_parquet(g)
    with pytest.raises(CorpusError, match=r"no 'text' column \(columns: \['story'\]\)"):
        read_documents(g)


def test_parquet_that_is_corrupt_or_whose_text_is_not_strings(tmp_path):
    # a corrupt file was a pyarrow traceback; an int 'text' column was reported as "no non-empty documents"
    import pandas as pd

    good = tmp_path / "good.parquet"
    pd.DataFrame({"text": ["one story", "another"]}).to_parquet(good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(CorpusError, match=r"cut\.parquet cannot be read as Parquet \(.*\); the file is truncated"):
        read_documents(cut)
    ints = tmp_path / "ints.parquet"
    pd.DataFrame({"text": [1, 2]}).to_parquet(ints)
    with pytest.raises(CorpusError, match=r"ints\.parquet: the 'text' column holds int64, expected strings"):
        read_documents(ints)
    large = tmp_path / "large.parquet"  # large_string is a string column too
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(["x y", None], type=pa.large_string())}), large)
    assert read_documents(large) == ["x y"]


def test_folder_with_one_file_and_ambiguous_folder(tmp_path):
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "c.txt").write_text("s1\n<|endoftext|>\ns2")
    assert read_documents(tmp_path) == ["s1", "s2"]
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(CorpusError, match="exactly one corpus file.*c.txt, d.jsonl"):
        read_documents(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="found: none"):
        read_documents(empty)


def test_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        read_documents(tmp_path / "nope.txt")
    f = tmp_path / "e.txt"
    f.write_text("\n<|endoftext|>\n  \n")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        read_documents(f)


@pytest.mark.shared_data
def test_shared_tinystories_validation_has_1000_stories():
    path = SHARED / "tinystories-v1-valid-first1000" / "tinystories_val.txt"
    if not path.is_file():
        pytest.skip(f"shared data absent: {path}")
    docs = read_documents(path)
    # SOURCE.md: split on <|endoftext|> and strip -> exactly 1,000 stories, 791,451 story characters.
    assert len(docs) == 1000
    assert sum(len(d) for d in docs) == 791_451
    assert docs[0].startswith("Spot. Spot saw the shiny car and said")
    assert docs[1].startswith("Once upon a time, in a big forest, there lived a rhinoceros named Roxy")
    assert sum('said, "' in d for d in docs) == 292
