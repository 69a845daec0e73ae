"""Prints the module-level import graph of mpma_jax (who imports whom inside the package) and
checks its layering: no import cycle, no flags defined outside mpma_jax/cli/, and imports inside
functions only for optional or deferred dependencies.

  python tools/import_graph.py           # the graph, one module per line, then the checks
  python tools/import_graph.py --check   # only the checks; exit 1 on a violation

Reads the source (ast); imports nothing from the package.
"""
import ast
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mpma_jax")
# Imported inside functions on purpose, and only these: the optional extras (torch, libtpu) and
# matplotlib, which only the pictures need.
DEFERRED_OK = ("torch", "libtpu", "matplotlib", "mpma_jax.data.builders")
# Function-level imports of the package itself: only the dataset registry, which imports each
# builder on demand, by name.
DEFERRED_PACKAGE_OK = ("mpma_jax.data.builders",)


def modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        name = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def _targets(node: ast.AST, known: dict) -> list[str]:
  """Package modules named by an import statement."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
    names = [
        f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
        for a in node.names
    ]
  else:
    return []
  return [n for n in names if n in known]


def graph(known: dict) -> tuple[dict, list]:
  """({module: sorted package modules it imports at module level}, [(module, line, import) of
  every import inside a function])."""
  edges, deferred = {}, []
  for name, path in sorted(known.items()):
    with open(path) as f:
      tree = ast.parse(f.read())
    edges[name] = sorted({t for node in tree.body for t in _targets(node, known)} | {
        t for node in tree.body if isinstance(node, (ast.If, ast.Try)) for sub in ast.walk(node)
        for t in _targets(sub, known)
    })
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for sub in ast.walk(fn):
          if isinstance(sub, (ast.Import, ast.ImportFrom)):
            top = (sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name) or ""
            deferred.append((name, sub.lineno, top))
  return edges, deferred


def cycles(edges: dict) -> list[list[str]]:
  """Every import cycle (as a path that returns to its start), found by depth-first search."""
  found, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in edges.get(node, ()):
      if state.get(nxt) == "open":
        found.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in edges:
    if node not in state:
      visit(node, [node])
  return found


def violations(known: dict) -> list[str]:
  edges, deferred = graph(known)
  out = [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
  for name, line, top in deferred:
    if not top.startswith(DEFERRED_OK):
      out.append(f"{name}:{line}: 'import {top}' inside a function")
    elif top.startswith("mpma_jax") and not name.startswith(DEFERRED_PACKAGE_OK):
      out.append(f"{name}:{line}: 'import {top}' inside a function (only commands defer the "
                 "package's own imports)")
  for name, path in known.items():
    if name.startswith("mpma_jax.cli"):
      continue
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
          node.func.attr.startswith("DEFINE") and isinstance(node.func.value, ast.Name) and
          node.func.value.id in ("flags", "config_flags") and
          not any(k.arg == "flag_values" for k in node.keywords)):  # a private FlagValues
        out.append(f"{name}:{node.lineno}: defines a flag outside mpma_jax/cli/")
  return out


def main(argv: list[str]) -> int:
  known = modules()
  if "--check" not in argv:
    edges, _ = graph(known)
    for name, targets in edges.items():
      short = [t.removeprefix("mpma_jax.") for t in targets]
      print(f"{name.removeprefix('mpma_jax.') or 'mpma_jax'}: {', '.join(short) or '-'}")
  problems = violations(known)
  for p in problems:
    print(p, file=sys.stderr)
  print(f"{len(known)} modules; {len(problems)} layering problems", file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
