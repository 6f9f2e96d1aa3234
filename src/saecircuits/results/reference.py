"""The JSON Schema and the Markdown reference of results.json, both generated from the models.

``python -m saecircuits.results --write-schema`` writes ``src/saecircuits/assets/results.schema.json`` (shipped in
the package) and ``docs/results.md`` (in a source checkout); ``--check`` exits 1 when either is stale (a test runs
the same comparison). ``--check runs/demo/results.json`` (or a run directory; several may be given) validates a run's
file against the schema instead: one line per problem, naming its key, and exit 1 when any file fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from saecircuits.results.errors import SCHEMA_VERSION
from saecircuits.results.top import Results

PACKAGE = Path(__file__).resolve().parents[1]
SCHEMA_PATH = PACKAGE / "assets" / "results.schema.json"
DOCS_PATH = PACKAGE.parents[1] / "docs" / "results.md"  # the repository's docs/ (a source checkout)
COMMAND = "python -m saecircuits.results --write-schema"


def json_schema() -> dict[str, Any]:
    """``Results.model_json_schema()`` with the draft and a title naming the version."""
    schema = Results.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"saecircuits results.json, schema version {SCHEMA_VERSION}",
            **{k: v for k, v in schema.items() if k != "title"}}


def schema_text() -> str:
    """The shipped schema file's text."""
    return json.dumps(json_schema(), indent=1, ensure_ascii=False) + "\n"


def _type(s: dict[str, Any]) -> str:
    """A property's JSON Schema as a short type for people: ``[number | null] (2 items)``, ``{str: Example}``."""
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "const" in s:
        return json.dumps(s["const"])
    if "enum" in s:
        return " \\| ".join(json.dumps(v) for v in s["enum"])
    if "anyOf" in s:
        return " \\| ".join(_type(a) for a in s["anyOf"])
    t = s.get("type")
    if t == "array":
        if "prefixItems" in s:
            return "[" + ", ".join(_type(p) for p in s["prefixItems"]) + "]"
        inner = f"[{_type(s.get('items', {}))}]"
        n = s.get("minItems")
        return f"{inner} ({n} items)" if n is not None and n == s.get("maxItems") else inner
    if t == "object":
        extra = s.get("additionalProperties")
        return f"{{str: {_type(extra)}}}" if isinstance(extra, dict) else "object (free-form)"
    return {"integer": "int", "number": "number", "string": "str", "boolean": "bool", "null": "null"}.get(t, "any")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section(name: str, d: dict[str, Any]) -> list[str]:
    out = [f"## {name}", ""]
    for para in (d.get("description") or "").split("\n\n"):  # paragraphs; an indented one is code
        lines = para.splitlines()
        if lines and all(line.startswith("    ") for line in lines):
            out += ["```python", *(line[4:] for line in lines), "```", ""]
        elif para.strip():
            out += [" ".join(line.strip() for line in lines).replace("::", ":"), ""]
    required = set(d.get("required", []))
    out += ["| key | type | description |", "|---|---|---|"]
    for key, prop in d.get("properties", {}).items():
        mark = f"**{key}** *" if key in required else key
        out.append(f"| {mark} | {_type(prop)} | {_cell(prop.get('description', ''))} |")
    return [*out, ""]


def _order(schema: dict[str, Any]) -> list[str]:
    """The models in reading order: breadth first from the top, each property's models in field order."""
    defs = schema["$defs"]
    seen, queue = [], [schema]
    while queue:
        node = queue.pop(0)
        refs: list[str] = []

        def collect(s: Any, refs: list[str] = refs) -> None:
            if isinstance(s, dict):
                if "$ref" in s:
                    refs.append(s["$ref"].rsplit("/", 1)[-1])
                for v in s.values():
                    collect(v)
            elif isinstance(s, list):
                for v in s:
                    collect(v)

        collect(node.get("properties", {}))
        for r in refs:
            if r not in seen:
                seen.append(r)
                queue.append(defs[r])
    return seen + sorted(set(defs) - set(seen))


def markdown() -> str:
    """``docs/results.md``: every model of results.json, one table each, from the field descriptions."""
    schema = json_schema()
    lines = [
        f"# results.json reference (schema version {SCHEMA_VERSION})",
        "",
        f"<!-- Generated from the models in src/saecircuits/results/ by `{COMMAND}`; do not edit by hand. -->",
        "",
        "What the pipeline saves and the report reads: the report re-renders from this file alone. Read it with",
        "`saecircuits.results.Results.load(path)` (typed, validated; a version-1 file is upgraded), e.g.",
        "`Results.load(path).saes[0].feature_effects`. The JSON Schema is the package file",
        "`saecircuits/assets/results.schema.json`.",
        "",
        "Keys in **bold** with `*` are required; every other key may be absent. `number` values may also be null",
        "(NaN and +-inf are written as null; a ratio that is undefined is null with a reason). Unknown extra keys",
        "are allowed everywhere and kept. `CI`: a 95% interval given as a half-width (mean -+ ci95) or a `[lo, hi]`",
        "pair. Shapes: `[C]` a list of C items; lists named together with the same letter are aligned one-to-one.",
        "",
        "Versions: 2 named the two explained variances by what they are (version 1 called both",
        "`explained_variance`): the SAE entry's `explained_variance_at_p` (at P, across prompts) and the training",
        "metrics' `explained_variance_tokens` (over the last training batch's tokens). A version-1 file is read by",
        "renaming them (`saecircuits.results.upgrade_results`); any other version is refused, naming it.",
        "",
    ]
    lines += _section("Results", schema)
    for name in _order(schema):
        lines += _section(name, schema["$defs"][name])
    return "\n".join(lines).rstrip("\n") + "\n"


def outputs() -> dict[Path, str]:
    """Each generated file and its text (docs/results.md only in a source checkout)."""
    out = {SCHEMA_PATH: schema_text()}
    if DOCS_PATH.parent.parent.joinpath("pyproject.toml").is_file():
        out[DOCS_PATH] = markdown()
    return out


MAX_PROBLEMS = 20
"""Problems listed per file by ``--check FILE`` (then how many more)."""


def check_file(path: str | Path) -> list[str]:
    """The problems of one run's results.json (``path``: the file or its run directory) against the schema, one
    sentence each; [] when it is valid. Nothing is raised: a missing or unreadable file is a problem too."""
    if not str(path).strip():  # Path("") is the current folder
        return ["the path is empty; pass a run's results.json or its run directory"]
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        return [f"no such file: {p} (pass a run's results.json or its run directory)"]
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        return [f"not UTF-8 text ({e.reason} at byte {e.start}): is it a results.json?"]
    except json.JSONDecodeError as e:
        return [f"not valid JSON: {e}"]
    except OSError as e:
        return [f"cannot be read: {e.strerror or e}"]
    return Results.problems(d)


def main(argv: list[str] | None = None) -> int:
    """``--write-schema``: write the files; ``--check``: exit 1 naming each stale one; ``--check FILE ...``: exit 1
    naming each problem of each file."""
    parser = argparse.ArgumentParser(prog="python -m saecircuits.results", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write-schema", action="store_true", help="write the JSON Schema and docs/results.md")
    group.add_argument("--check", nargs="*", metavar="RESULTS",
                       help="without a path: exit 1 when a generated file is stale; with paths (a run's results.json "
                            "or its run directory): validate each against the schema, one line per problem, exit 1 "
                            "when any fails")
    args = parser.parse_args(argv)
    if args.check:
        failed = 0
        for path in args.check:
            problems = check_file(path)
            failed += bool(problems)
            if not problems:
                print(f"{path}: valid (results.json schema version {SCHEMA_VERSION})")
            for text in problems[:MAX_PROBLEMS]:
                print(f"{path}: {text}")
            if len(problems) > MAX_PROBLEMS:
                print(f"{path}: ... and {len(problems) - MAX_PROBLEMS} more problems")
        return 1 if failed else 0
    from saecircuits.atomic import atomic_write_text

    stale = [p for p, text in outputs().items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check is not None:
        for p in stale:
            print(f"{p} is stale: run `{COMMAND}`")
        return 1 if stale else 0
    for p, text in outputs().items():
        atomic_write_text(p, text)
        print(f"wrote {p}")
    return 0
