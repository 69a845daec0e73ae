"""Config overrides ("train.epochs=1"): the one parser and the one checked setter used by mpma-sweep,
mpma-eval --suite, the benchmarks and the tests. (Command lines take `--config.a.b=value`, which
ml_collections parses itself.)"""
import ast
import difflib
from typing import Any, Iterable, Mapping, Union

import ml_collections


def parse(text: str) -> tuple[str, Any]:
  """'key=value' -> (key, value): the value as a Python literal (1, 0.5, ('a', 'b'), True) when it
  is one, else the string."""
  key, sep, value = text.partition("=")
  if not sep or not key.strip():
    raise ValueError(f"override {text!r}: expected key=value, e.g. train.epochs=1")
  try:
    return key.strip(), ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    return key.strip(), value.strip()


def field_parent(config: ml_collections.ConfigDict, field: str, where: str):
  """(the ConfigDict holding field, its last name); ValueError naming `where` if there is none."""
  parts = field.split(".")
  node = config
  for i, part in enumerate(parts):
    path = ".".join(parts[:i]) or "the config"
    if not isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f"{where}: unknown config field {field!r}: {path} is a "
                       f"{type(node).__name__}, not a group of fields")
    if part not in node:
      known = sorted(node.keys())
      close = difflib.get_close_matches(part, known, n=1)
      hint = (f"did you mean {'.'.join(parts[:i] + close)!r}?"
              if close else f"{path} has: {', '.join(known)}")
      raise ValueError(f"{where}: unknown config field {field!r} ({path} has no {part!r}; {hint})")
    if i < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def apply(config: ml_collections.ConfigDict, field: str, value: Any,
          where: str = "override") -> Any:
  """Sets config.<field> = value in place; returns the value as the config stores it (an int given
  for a float field becomes a float). Raises ValueError naming `where` and the field on an unknown
  field or a value of the wrong type."""
  node, leaf = field_parent(config, field, where)
  old = node[leaf]
  if isinstance(old, ml_collections.ConfigDict):
    raise ValueError(f"{where}: {field} is a group of fields, not a value; override its fields "
                     f"({', '.join(f'{field}.{k}' for k in old.keys())})")
  # ConfigDict lets a bool into an int field (bool is an int), but `--config.x=True` then fails
  if isinstance(value, bool) and old is not None and not isinstance(old, bool):
    raise ValueError(f"{where}: {field}={value!r} is a bool but the config holds a "
                     f"{type(old).__name__} ({old!r})")
  if isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except TypeError:
    raise ValueError(f"{where}: {field}={value!r} is a {type(value).__name__} but the config holds "
                     f"a {type(old).__name__} ({old!r})") from None
  return node[leaf]


def apply_all(config: ml_collections.ConfigDict, changes: Union[Mapping[str, Any], Iterable[str]],
              where: str = "override"):
  """Applies {field: value} or ['field=value', ...] to config in place; returns config."""
  items = changes.items() if isinstance(changes, Mapping) else (parse(c) for c in changes)
  for field, value in items:
    apply(config, field, value, where)
  return config
