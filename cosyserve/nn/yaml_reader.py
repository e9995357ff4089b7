"""A safe reader for CosyVoice's HyperPyYAML model configs (`cosyvoice.yaml`, `cosyvoice2.yaml`, ...).

Upstream loads the file with `hyperpyyaml.load_hyperpyyaml`, which imports and calls whatever
the tags name (`!new:`, `!name:`, `!apply:`). A model directory downloaded from the internet must
not be able to run code, so here every tag becomes an inert :class:`Tagged` record (the dotted
path is only a string) and `!ref` is resolved by looking keys up in the document. Each family then maps the inference keys
(`llm`, `flow`, `hift`, ...) of the inert tree into its typed configs with :class:`ConfigNode`
(the class path under each key identifies the architecture; upstream constructor defaults apply
where the file omits a value). Training-only keys are parsed inertly and ignored.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import math
import operator
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cosyserve.errors import ModelConfigError

logger = logging.getLogger(__name__)

# A model directory comes from the internet: these bound what reading its yaml may cost. The
# official files are ~6 KB, with a few dozen `!ref`s and no YAML aliases; the limits leave a
# hundredfold room and stop alias bombs ("billion laughs"), `!ref` chains that double a string
# at every level, and arithmetic that builds enormous numbers, each with a message naming the file.
MAX_YAML_BYTES = 1024 * 1024
MAX_EXPANDED_NODES = 200_000  # nodes of the document with every alias expanded
MAX_REF_DEPTH = 64  # `!ref` chains (a -> b -> c ...)
MAX_REFS = 20_000  # `!ref` resolutions in one document
MAX_REF_STRING = 64 * 1024  # characters of one interpolated `!ref` string
MAX_REF_NUMBER = 2.0**64  # magnitude of an arithmetic `!ref` result

__all__ = [
    "MAX_YAML_BYTES",
    "MISSING",
    "ConfigContext",
    "ConfigNode",
    "Placeholder",
    "Ref",
    "Tagged",
    "load_yaml_tree",
    "parse_yaml_tree",
]


# --------------------------------------------------------------------------------------------
# Inert YAML nodes
# --------------------------------------------------------------------------------------------


@dataclass
class Tagged:
    """An inert `!new:` / `!name:` / `!apply:` (or any other tag) node. Nothing is imported."""

    kind: str  # "new" | "name" | "apply" | "include" | "tag"
    target: str  # dotted path (for "tag": the full tag)
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"!{self.kind}:{self.target}"


@dataclass
class Ref:
    """`!ref <key>` (or an expression / string interpolation of several refs); resolved later."""

    expr: str
    copy: bool = False


class Placeholder:
    """HyperPyYAML's `!PLACEHOLDER`: a value the user must override. Never used at inference."""

    def __repr__(self) -> str:
        return "!PLACEHOLDER"


def _construct_tagged(kind: str) -> Callable[[yaml.SafeLoader, str, yaml.Node], Tagged]:
    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Tagged:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if isinstance(node, yaml.MappingNode):
            kwargs = {str(k): v for k, v in loader.construct_mapping(node, deep=True).items()}
        elif isinstance(node, yaml.SequenceNode):
            args = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
            if value not in ("", None):
                args = [value]
        return Tagged(kind=kind, target=suffix, args=args, kwargs=kwargs)

    return construct


def _construct_other_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Tagged:
    # Any tag we do not know (e.g. in a training-only section) stays an inert record; mapping it
    # to an inference field is an error later, with the key named.
    tagged = _construct_tagged("tag")(loader, suffix, node)
    tagged.target = "!" + suffix
    return tagged


def _construct_ref(loader: yaml.SafeLoader, node: yaml.Node) -> Ref:
    return Ref(str(loader.construct_scalar(node)))


def _construct_copy(loader: yaml.SafeLoader, node: yaml.Node) -> Ref:
    return Ref(str(loader.construct_scalar(node)), copy=True)


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[Any, ...]:
    if isinstance(node, yaml.SequenceNode):
        return tuple(loader.construct_sequence(node, deep=True))
    text = str(loader.construct_scalar(node)).strip()
    try:
        value = ast.literal_eval(text if text.startswith("(") else f"({text},)")
    except (ValueError, SyntaxError) as exc:
        raise yaml.constructor.ConstructorError(None, None, f"bad !tuple {text!r}", node.start_mark) from exc
    return tuple(value) if isinstance(value, tuple) else (value,)


def _construct_placeholder(loader: yaml.SafeLoader, node: yaml.Node) -> Placeholder:
    return Placeholder()


# libyaml's parser when PyYAML has it (ten times faster on large hostile files); the tags,
# resolvers and constructors stay Python either way.
_SafeLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _InertLoader(_SafeLoader):  # type: ignore[misc,valid-type]
    """SafeLoader plus HyperPyYAML's tags, all of which build inert records. The composed node
    graph is measured before anything is constructed: aliases share nodes, so a small file can
    stand for an exponentially large document."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise _TooLarge(f"it has more than {MAX_EXPANDED_NODES:,} nodes once its aliases are expanded")
        return node


class _TooLarge(yaml.YAMLError):
    """The document exceeds one of the reader's limits."""


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes of ``node`` with every alias expanded, counted over the shared graph (linear time)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = MAX_EXPANDED_NODES + 1  # a cycle (a recursive alias) counts as too large
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, memo)
        if total > MAX_EXPANDED_NODES:
            break
    memo[id(node)] = total
    return total


# YAML 1.2 floats such as `1e-06` (no dot): HyperPyYAML (ruamel, YAML 1.2) reads them as numbers.
_InertLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
# Order matters: PyYAML tries multi-constructor prefixes in insertion order, "!" is the catch-all.
_InertLoader.add_multi_constructor("!new:", _construct_tagged("new"))
_InertLoader.add_multi_constructor("!name:", _construct_tagged("name"))
_InertLoader.add_multi_constructor("!apply:", _construct_tagged("apply"))
_InertLoader.add_multi_constructor("!include:", _construct_tagged("include"))
_InertLoader.add_constructor("!ref", _construct_ref)
_InertLoader.add_constructor("!copy", _construct_copy)
_InertLoader.add_constructor("!tuple", _construct_tuple)
_InertLoader.add_constructor("!PLACEHOLDER", _construct_placeholder)
_InertLoader.add_multi_constructor("!", _construct_other_tag)


# --------------------------------------------------------------------------------------------
# !ref resolution
# --------------------------------------------------------------------------------------------

_REF_RE = re.compile(r"<([^<>]+)>")
_KEY_PART_RE = re.compile(r"\[([^\[\]]+)\]|\.?([^.\[\]]+)")

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARYOPS: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _OutOfRange(Exception):
    """An arithmetic `!ref` whose value (or a step of it) exceeds :data:`MAX_REF_NUMBER`."""


def _eval_arithmetic(text: str) -> Any:
    """Evaluate a plain arithmetic expression over number literals (HyperPyYAML's `!ref <a> * <b>`).

    Walks the AST itself, so nothing but numbers and + - * / // % ** can be evaluated.
    Raises ValueError for anything else.
    """

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)
        ):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:  # no 10**10**10 bombs
                raise ValueError("exponent too large")
            result = _BINOPS[type(node.op)](left, right)
            if not _finite_number(result):  # checked at every step: no giant intermediates
                raise _OutOfRange(text.strip())
            return result
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
            return _UNARYOPS[type(node.op)](walk(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)}")

    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(str(exc)) from exc
    return walk(tree)


class _Resolver:
    def __init__(self, root: dict[str, Any], source: str):
        self.root = root
        self.source = source
        self.done: dict[str, Any] = {}
        self.active: list[str] = []
        self.resolved = 0
        self.visited: set[int] = set()  # containers already resolved (YAML aliases share them)

    def lookup(self, key: str) -> Any:
        if key in self.done:
            return self.done[key]
        if key in self.active:
            chain = " -> ".join([*self.active, key])
            raise ModelConfigError(f"{self.source}: circular !ref: {chain}")
        if len(self.active) >= MAX_REF_DEPTH:
            raise ModelConfigError(
                f"{self.source}: !ref <{key}> is nested more than {MAX_REF_DEPTH} refs deep"
            )
        self.resolved += 1
        if self.resolved > MAX_REFS:
            raise ModelConfigError(f"{self.source}: more than {MAX_REFS:,} !ref resolutions")
        self.active.append(key)
        try:
            node: Any = self.root
            for bracket, plain in _KEY_PART_RE.findall(key.strip()):
                part = (bracket or plain).strip().strip("'\"")
                if isinstance(node, Ref):  # only refs on the path; never the whole container
                    node = self.resolve_ref(node)
                if isinstance(node, Tagged):
                    node = node.kwargs
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit():
                    node = node[int(part)]
                else:
                    raise ModelConfigError(f"{self.source}: !ref <{key}> names a key that does not exist")
            value = self.resolve(node)
        finally:
            self.active.pop()
        self.done[key] = value
        return value

    def resolve_ref(self, ref: Ref) -> Any:
        refs = _REF_RE.findall(ref.expr)
        if not refs:
            raise ModelConfigError(f"{self.source}: !ref {ref.expr!r} contains no <key>")
        if ref.expr.strip() == f"<{refs[0]}>":
            return self.lookup(refs[0])  # plain reference: the object itself (shared, like upstream)
        # Several refs or text around them: substitute, then arithmetic if it is arithmetic,
        # otherwise string interpolation (HyperPyYAML's behaviour for e.g. paths).
        pieces: list[str] = []
        length = 0
        for index, part in enumerate(_REF_RE.split(ref.expr)):
            piece = str(self.lookup(part)) if index % 2 else part  # odd parts: the <key>s
            length += len(piece)
            if length > MAX_REF_STRING:
                raise ModelConfigError(
                    f"{self.source}: !ref {ref.expr[:80]!r} builds a string over {MAX_REF_STRING:,} characters"
                )
            pieces.append(piece)
        text = "".join(pieces)
        try:
            value = _eval_arithmetic(text)
        except (ValueError, ZeroDivisionError, OverflowError, TypeError):
            return text
        except _OutOfRange:
            value = math.inf
        if not _finite_number(value):
            raise ModelConfigError(
                f"{self.source}: !ref {ref.expr[:80]!r} gives a number beyond {MAX_REF_NUMBER:.0e}"
            )
        return value

    def resolve(self, node: Any) -> Any:
        if isinstance(node, Ref):
            return self.resolve_ref(node)
        if isinstance(node, (dict, list, Tagged)):
            if id(node) in self.visited:
                return node
            self.visited.add(id(node))
        if isinstance(node, dict):
            for key, value in node.items():
                node[key] = self.resolve(value)
            return node
        if isinstance(node, list):
            for i, value in enumerate(node):
                node[i] = self.resolve(value)
            return node
        if isinstance(node, Tagged):
            self.resolve(node.args)
            self.resolve(node.kwargs)
            return node
        return node


def _finite_number(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) <= MAX_REF_NUMBER
    return not isinstance(value, int) or abs(value) <= MAX_REF_NUMBER


def parse_yaml_tree(text: str, source: str = "<string>") -> dict[str, Any]:
    """Parse HyperPyYAML text into plain Python data with inert :class:`Tagged` nodes, refs
    resolved. Every limit above is a :class:`ModelConfigError` that names ``source``."""
    if len(text) > MAX_YAML_BYTES:
        raise ModelConfigError(
            f"{source}: {len(text):,} characters; a model config is at most {MAX_YAML_BYTES:,} "
            "(the official ones are about 6 KB)"
        )
    try:
        root = yaml.load(text, Loader=_InertLoader)  # noqa: S506 - _InertLoader is a SafeLoader
    except _TooLarge as exc:
        raise ModelConfigError(f"{source}: refused: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ModelConfigError(f"{source}: not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ModelConfigError(f"{source}: refused: nested too deeply") from exc
    if not isinstance(root, dict):
        raise ModelConfigError(f"{source}: expected a mapping at the top level, got {type(root).__name__}")
    try:
        return _Resolver(root, source).resolve(root)
    except RecursionError as exc:
        raise ModelConfigError(f"{source}: refused: nested too deeply") from exc


def load_yaml_tree(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a HyperPyYAML file safely (see :func:`parse_yaml_tree`); a file over
    :data:`MAX_YAML_BYTES` is refused before it is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ModelConfigError(
                f"{path}: {size:,} bytes; a model config is at most {MAX_YAML_BYTES:,} "
                "(the official ones are about 6 KB)"
            )
        with path.open("rb") as handle:
            raw = handle.read(MAX_YAML_BYTES + 1)  # the file may grow after stat()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ModelConfigError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
    return parse_yaml_tree(text, source=str(path))


# --------------------------------------------------------------------------------------------
# Typed access to the parsed tree (what the families' config mappings use)
# --------------------------------------------------------------------------------------------

MISSING = object()


class ConfigNode:
    """Typed access to one `!new:` / `!name:` node's keyword arguments, with upstream defaults."""

    def __init__(self, ctx: ConfigContext, key: str, tagged: Tagged):
        self.ctx = ctx
        self.key = key
        self.tagged = tagged
        self.kwargs = tagged.kwargs
        if tagged.args:
            ctx.fail(f"'{key}' ({tagged.target}): positional arguments are not supported, use key: value")

    def _get(self, name: str, default: Any) -> Any:
        value = self.kwargs.get(name, default)
        if value is MISSING:
            self.ctx.fail(f"'{self.key}' ({self.tagged.target}) is missing the required argument '{name}'")
        if isinstance(value, (Tagged, Placeholder)):
            self.ctx.fail(f"'{self.key}.{name}' must be a plain value, got {value!r}")
        return value

    def _bad(self, name: str, value: Any, want: str) -> None:
        self.ctx.fail(f"'{self.key}.{name}' must be {want}, got {value!r}")

    def int(self, name: str, default: Any = MISSING) -> int:
        value = self._get(name, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self._bad(name, value, "an integer")
        return value

    def float(self, name: str, default: Any = MISSING) -> float:
        value = self._get(name, default)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # "1e-06" read as a string by YAML 1.1 rules
                value = float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self._bad(name, value, "a number")
        return float(value)

    def bool(self, name: str, default: Any = MISSING) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            self._bad(name, value, "true or false")
        return value

    def str(self, name: str, default: Any = MISSING) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            self._bad(name, value, "a string")
        return value

    def ints(self, name: str, default: Any = MISSING) -> tuple[int, ...]:
        value = self._get(name, default)
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            self._bad(name, value, "a list of integers")
        return tuple(value)

    def int_lists(self, name: str, default: Any = MISSING) -> tuple[tuple[int, ...], ...]:
        value = self._get(name, default)
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(row, (list, tuple))
            and all(isinstance(v, int) and not isinstance(v, bool) for v in row)
            for row in value
        )
        if not ok:
            self._bad(name, value, "a list of lists of integers")
        return tuple(tuple(row) for row in value)

    def require(self, name: str, value: Any, allowed: Iterable[Any], what: str = "") -> None:
        allowed = tuple(allowed)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            self.ctx.fail(f"'{self.key}.{name}' = {value!r} is not supported{what} (supported: {choices})")

    def child(self, name: str, classes: tuple[str, ...], default: Any = MISSING) -> ConfigNode:
        value = self.kwargs.get(name, default)
        return self.ctx.node(f"{self.key}.{name}", value, classes)


class ConfigContext:
    def __init__(self, source: str):
        self.source = source

    def fail(self, message: str) -> None:
        raise ModelConfigError(f"{self.source}: {message}")

    def node(
        self, key: str, value: Any, classes: tuple[str, ...], kinds: tuple[str, ...] = ("new",)
    ) -> ConfigNode:
        if value is MISSING or value is None:
            self.fail(f"the inference key '{key}' is missing (expected !{kinds[0]}:{classes[0]})")
        if not isinstance(value, Tagged) or value.kind not in kinds:
            self.fail(f"'{key}' must be a !{kinds[0]}:{classes[0]} node, got {value!r}")
        if value.target not in classes:
            self.fail(
                f"'{key}' names the unknown class '{value.target}' (supported here: {', '.join(classes)})"
            )
        return ConfigNode(self, key, value)
