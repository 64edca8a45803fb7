"""The chart's README, generated from the comments in values.yaml (the one source for what a value means).

Every key in values.yaml has a comment right above it that starts with the key's path
("# agent.securityMode is how ..."): that comment is the key's description. A key whose
children are commented is a section (a row without a default; its children follow); a key
whose children are not (operator.resources, monitoring.dashboard.labels) is one row whose
default is the whole subtree. `render` is pure: values.yaml and Chart.yaml text in,
Markdown out; tests/unit/test_chart_readme.py fails when the committed README differs.

    python -m helm.chart_readme            print the README it would write
    python -m helm.chart_readme --write    rewrite helm/retransmit-operator/README.md
    python -m helm.chart_readme --check    exit 1 when the committed README differs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

CHART = Path(__file__).resolve().parent / "retransmit-operator"
README = CHART / "README.md"

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_.-]*):(?:\s|$)")
COMMENT_LINE = re.compile(r"^ *#(?: (?P<text>.*))?$")


@dataclass(frozen=True)
class Value:
    """One documented key of values.yaml."""
    path: str             # "agent.securityMode"
    description: str      # its comment, lines joined
    section: bool         # its children are documented rows of their own
    default: Any          # the value in values.yaml (the whole subtree)


def documented_values(values_text: str) -> list[Value]:
    """The commented keys of `values_text` in file order. Raises ValueError naming the line
    of a key without a comment, or of a comment that does not start with its key's path."""
    data = yaml.safe_load(values_text) or {}
    lines = values_text.splitlines()
    keys: list[tuple[int, int, str, str]] = []        # (line number, indent, path, description)
    stack: list[tuple[int, str]] = []                 # (indent, path) of the enclosing keys
    for number, line in enumerate(lines, start=1):
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent, key = len(match["indent"]), match["key"]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = f"{stack[-1][1]}.{key}" if stack else key
        stack.append((indent, path))
        if not isinstance(_lookup(data, path), _Missing):
            keys.append((number, indent, path, _comment_above(lines, number - 1)))
    commented = {path for _, _, path, text in keys if text}
    out: list[Value] = []
    for number, _, path, text in keys:
        parent = path.rpartition(".")[0]
        if not text:
            ancestor = _nearest(parent, commented)
            if ancestor is None or (ancestor == parent and _has_commented_child(parent, commented)):
                raise ValueError(f"values.yaml line {number}: {path} has no comment: add one above it "
                                 f"that starts with '{path}'")
            continue                                  # part of a documented ancestor's default
        if parent and parent not in commented:
            continue                                  # below an undocumented key, which raised above
        if not re.match(rf"{re.escape(path)}\b", text):
            raise ValueError(f"values.yaml line {number}: the comment of {path} must start with '{path}', "
                             f"not {text[:40]!r}")
        out.append(Value(path=path, description=text, section=_has_commented_child(path, commented),
                         default=_lookup(data, path)))
    return out


class _Missing:
    pass


def _lookup(data: Any, path: str) -> Any:
    """The value at `path`, or a _Missing when a step is not a mapping key (keys inside lists)."""
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _Missing()
        node = node[part]
    return node


def _nearest(path: str, commented: set[str]) -> Optional[str]:
    """`path` or its nearest ancestor that has a comment; None when none has."""
    while path:
        if path in commented:
            return path
        path = path.rpartition(".")[0]
    return None


def _has_commented_child(path: str, commented: set[str]) -> bool:
    return any(p.rpartition(".")[0] == path for p in commented)


def _comment_above(lines: Sequence[str], index: int) -> str:
    """The comment block directly above lines[index] (no blank line between), joined."""
    block: list[str] = []
    i = index - 1
    while i >= 0:
        match = COMMENT_LINE.match(lines[i])
        if not match:
            break
        block.append((match["text"] or "").strip())
        i -= 1
    return " ".join(part for part in reversed(block) if part)


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def default_text(value: Any) -> str:
    """The default as a Markdown code span: JSON, as `helm --set-json` takes it."""
    text = json.dumps(value, separators=(", ", ": "))
    return f"`{text}`"


def _cell(text: str) -> str:
    """`text` safe in a table cell: pipes escaped, and angle brackets outside code spans
    (Markdown would read "<release>" as an HTML tag and show nothing)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;").replace(">", "&gt;") for i, part in enumerate(parts))


def render(values_text: str, chart_text: str) -> str:
    """The chart's README from values.yaml and Chart.yaml text."""
    chart = yaml.safe_load(chart_text)
    values = documented_values(values_text)
    out = [
        f"# {chart['name']} Helm chart",
        "",
        "<!-- Generated by `python -m helm.chart_readme --write` from values.yaml and Chart.yaml:",
        "     edit those, not this file (tests/unit/test_chart_readme.py fails on drift). -->",
        "",
        chart["description"],
        "",
        f"Chart version {chart['version']}, app version {chart['appVersion']}, "
        f"Kubernetes `{chart['kubeVersion']}`.",
        "",
        "```sh",
        "helm install retransmit-operator helm/retransmit-operator \\",
        "  --set operator.image.repository=registry.example.com/tools/retransmit-operator \\",
        "  --set operator.image.tag=0.1.0 \\",
        "  --set agent.image.repository=registry.example.com/tools/retransmit-agent --set agent.image.tag=0.1.0",
        "```",
        "",
        "Installing, upgrading, uninstalling and troubleshooting: the repository's README.md. "
        "The CRDs are in crds/: Helm installs them with the chart but never upgrades or deletes them.",
        "",
        "## Values",
        "",
        "Each row is a key of values.yaml, its type and default there, and the comment above it "
        "(a key whose keys have rows of their own shows no default). values.schema.json checks every value.",
    ]
    out += ["", "| key | type | default | description |", "|---|---|---|---|"]
    out += [_row(value) for value in values]
    return "\n".join(out) + "\n"


def _row(value: Value) -> str:
    default = "" if value.section else default_text(value.default)
    return (f"| `{value.path}` | {type_name(value.default)} | {_cell(default)} | "
            f"{_cell(value.description)} |")


def current() -> str:
    return render((CHART / "values.yaml").read_text(), (CHART / "Chart.yaml").read_text())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helm.chart_readme", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"rewrite {README.relative_to(CHART.parents[1])}")
    group.add_argument("--check", action="store_true", help="exit 1 when the committed README differs")
    args = parser.parse_args(argv)
    text = current()
    if args.write:
        README.write_text(text)
        return 0
    if args.check:
        if README.read_text() != text:
            print(f"{README} differs from values.yaml: run `python -m helm.chart_readme --write`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
