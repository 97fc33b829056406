"""The part of PromQL the observability tests need: which metrics and labels an expression uses.

Not a full parser (promtool checks syntax where it is installed): a tokenizer that knows
strings, durations, numbers and identifiers, plus the rules that tell a metric name from
a function, an aggregation, a keyword or a label name. It refuses what it does not
understand (a selector without a metric name, ``__name__`` matchers) rather than guess,
so a query it cannot read fails the test instead of passing unchecked.

Grafana's variables (``$__rate_interval``, ``$job``, ``${tenant}``) are replaced by values
Prometheus accepts before parsing (:func:`expand_grafana`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

#: What Grafana would put in place of its built-in variables, for parsing only.
GRAFANA_BUILTINS: Mapping[str, str] = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}

AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end"})

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*(?![A-Za-z0-9_:]))
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^@<>=,(){}\[\]:])
    """,
    re.VERBOSE,
)


class PromQLError(ValueError):
    """The expression uses something this reader does not understand."""


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


@dataclass
class Selector:
    metric: str
    labels: set[str] = field(default_factory=set)


@dataclass
class Uses:
    """What one expression reads: its selectors and the labels it groups or matches on."""

    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors}


def tokenize(expr: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(expr):
        if expr.startswith("#", pos):  # a comment runs to the end of the line
            end = expr.find("\n", pos)
            pos = len(expr) if end < 0 else end
            continue
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise PromQLError(f"cannot read {expr[pos : pos + 20]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append(Token(kind, match.group()))
        pos = match.end()
    return tokens


def _label_list(tokens: list[Token], start: int, expr: str) -> tuple[set[str], int]:
    """Label names in ``( a, b )`` starting at ``tokens[start]`` == "("; returns the index after ")"."""
    names: set[str] = set()
    i = start + 1
    while i < len(tokens) and tokens[i].text != ")":
        if tokens[i].kind == "ident":
            names.add(tokens[i].text)
        elif tokens[i].text != ",":
            raise PromQLError(f"unexpected {tokens[i].text!r} in a label list of {expr!r}")
        i += 1
    if i >= len(tokens):
        raise PromQLError(f"unclosed label list in {expr!r}")
    return names, i + 1


def _matchers(tokens: list[Token], start: int, expr: str) -> tuple[set[str], int]:
    """Label names in ``{ a="x", b=~"y" }`` starting at ``tokens[start]`` == "{"."""
    names: set[str] = set()
    i = start + 1
    while i < len(tokens) and tokens[i].text != "}":
        name, op, value = (tokens[i : i + 3] + [Token("", "")] * 3)[:3]
        if name.kind != "ident" or op.text not in ("=", "!=", "=~", "!~") or value.kind != "string":
            raise PromQLError(f"unreadable label matcher near {name.text!r} in {expr!r}")
        if name.text == "__name__":
            raise PromQLError(f"__name__ matchers hide the metric name: {expr!r}")
        names.add(name.text)
        i += 3
        if i < len(tokens) and tokens[i].text == ",":
            i += 1
    if i >= len(tokens):
        raise PromQLError(f"unclosed selector in {expr!r}")
    return names, i + 1


def uses(expr: str) -> Uses:
    """Metrics (with the labels their matchers name) and grouping labels of one expression."""
    tokens = tokenize(expr)
    out = Uses()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1].text if i + 1 < len(tokens) else ""
        if tok.text == "{":
            raise PromQLError(f"a selector without a metric name: {expr!r}")
        if tok.kind != "ident":
            i += 1
            continue
        word = tok.text
        if word in GROUPING:
            if nxt == "(":
                names, i = _label_list(tokens, i + 1, expr)
                out.grouping |= names
            else:
                i += 1  # group_left / group_right without a label list
            continue
        if word in AGGREGATIONS or word in KEYWORDS or nxt == "(":
            i += 1  # an aggregation, a keyword or a function call
            continue
        selector = Selector(word)
        i += 1
        if nxt == "{":
            selector.labels, i = _matchers(tokens, i, expr)
        out.selectors.append(selector)
    if not out.selectors:
        raise PromQLError(f"no metric in {expr!r}")
    return out


def expand_grafana(expr: str, variables: Mapping[str, str]) -> str:
    """Replace ``$name`` / ``${name}`` / ``[[name]]`` by ``variables`` or Grafana's built-ins."""
    values = {**GRAFANA_BUILTINS, **variables}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise PromQLError(f"unknown Grafana variable {name!r} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)
