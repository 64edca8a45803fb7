"""kubectl's `-o jsonpath=TEMPLATE` for one object (pure): the subset people type.

    {.status.phase}  {.metadata.labels['app.kubernetes.io/name']}  {.status.nodes[0].node}
    {.status.nodes[*].node}  {range .status.nodes[*]}{.node}{"\\t"}{.phase}{"\\n"}{end}

Text outside braces is printed as is; several results of one expression are joined by a
space; strings print bare, maps and lists as JSON; a missing key prints nothing (kubectl's
default --allow-missing-template-keys=true). Filters (`[?()]`), slices and `..` are refused
with the position, so a template never silently means something else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Union

NAME = re.compile(r"[A-Za-z0-9_\-$]+")
QUOTED = re.compile(r"""'([^']*)'|"((?:[^"\\]|\\.)*)\"""")
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"'}


class JsonPathError(ValueError):
    """A template that cannot be read, with where and why."""


Step = tuple[str, Union[str, int, None]]      # ("key", name) | ("index", n) | ("all", None)


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Path:
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Range:
    path: Path
    body: tuple[Any, ...]


def unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(1)), text)


def parse_path(expr: str, template: str) -> Path:
    """'.a.b[0][*]['c.d']' -> Path; '@' or '$' may lead; '.' alone is the object itself."""
    rest = expr.strip()
    if rest[:1] in ("@", "$"):
        rest = rest[1:]
    steps: list[Step] = []
    while rest:
        where = f"at {rest!r} in {template!r}"
        if rest.startswith(".."):
            raise JsonPathError(f"recursive descent '..' is not supported ({where})")
        if rest.startswith("."):
            rest = rest[1:]
            if rest.startswith("*"):
                steps.append(("all", None))
                rest = rest[1:]
                continue
            match = NAME.match(rest)
            if match:
                steps.append(("key", match.group()))
                rest = rest[match.end():]
            elif rest and not rest.startswith("["):
                raise JsonPathError(f"expected a field name {where}")
            continue
        if rest.startswith("["):
            close = rest.find("]")
            inner = rest[1:close].strip() if close > 0 else ""
            quoted = QUOTED.fullmatch(inner)
            if inner == "*":
                steps.append(("all", None))
            elif re.fullmatch(r"-?\d+", inner):
                steps.append(("index", int(inner)))
            elif quoted:
                steps.append(("key", quoted.group(1) if quoted.group(1) is not None else unescape(quoted.group(2))))
            else:
                raise JsonPathError(f"only [N], [*] and ['key'] are supported ({where})")
            rest = rest[close + 1:]
            continue
        raise JsonPathError(f"expected '.' or '[' {where}")
    return Path(tuple(steps))


def parse(template: str) -> tuple[Any, ...]:
    """The template as Text, Path and Range nodes; JsonPathError naming the spot otherwise."""
    stack: list[list[Any]] = [[]]
    ranges: list[Path] = []
    pos = 0
    while pos < len(template):
        start = template.find("{", pos)
        if start < 0:
            stack[-1].append(Text(template[pos:]))
            break
        if start > pos:
            stack[-1].append(Text(template[pos:start]))
        end = template.find("}", start)
        if end < 0:
            raise JsonPathError(f"unclosed '{{' at position {start} in {template!r}")
        expr = template[start + 1:end].strip()
        quoted = QUOTED.fullmatch(expr)
        if quoted:
            stack[-1].append(Text(quoted.group(1) if quoted.group(1) is not None else unescape(quoted.group(2))))
        elif expr.startswith("range ") or expr == "range":
            ranges.append(parse_path(expr[len("range"):], template))
            stack.append([])
        elif expr == "end":
            if not ranges:
                raise JsonPathError(f"{{end}} without {{range}} in {template!r}")
            body = stack.pop()
            stack[-1].append(Range(ranges.pop(), tuple(body)))
        else:
            stack[-1].append(parse_path(expr, template))
        pos = end + 1
    if ranges:
        raise JsonPathError(f"{{range}} without {{end}} in {template!r}")
    return tuple(stack[0])


def select(value: Any, path: Path) -> list[Any]:
    """Every value the path reaches from `value` (missing keys and indexes reach nothing)."""
    found = [value]
    for kind, arg in path.steps:
        nxt: list[Any] = []
        for v in found:
            if kind == "key" and isinstance(v, dict) and arg in v:
                nxt.append(v[arg])
            elif kind == "index" and isinstance(v, list) and -len(v) <= arg < len(v):  # type: ignore[operator]
                nxt.append(v[arg])  # type: ignore[index]
            elif kind == "all":
                nxt.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else [])
        found = nxt
    return found


def text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def execute(nodes: tuple[Any, ...], value: Any) -> str:
    out = []
    for node in nodes:
        if isinstance(node, Text):
            out.append(node.text)
        elif isinstance(node, Range):
            items = select(value, node.path)
            if len(items) == 1 and isinstance(items[0], list):    # {range .list} walks the list, as {range .list[*]}
                items = items[0]
            out.extend(execute(node.body, item) for item in items)
        else:
            out.append(" ".join(text_of(v) for v in select(value, node)))
    return "".join(out)


def render(template: str, value: Any) -> str:
    """`value` printed through the template (kubectl -o jsonpath=TEMPLATE)."""
    return execute(parse(template), value)
