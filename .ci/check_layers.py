"""The layers of the library, checked over its source with `ast` (run by `make test`):

* no library module imports a command module (`cli`): the commands are the top layer;
* no import cycle between the library's modules, imports inside functions included;
* no module above 450 code lines (blank lines, comments and docstrings not counted).

Prints one line per finding and exits 1 when there is any.
"""
from __future__ import annotations
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "self_supervised_swav"
COMMANDS = {"cli"}
MAX_LINES = 450


def modules() -> dict[str, Path]:
    "The library's modules by short name, without nbdev's index"
    return {p.stem: p for p in sorted((ROOT / PKG).glob("*.py")) if p.stem not in ("__init__", "_modidx")}


def imported(tree: ast.AST, names: set[str]) -> set[str]:
    "The library modules that `tree` imports anywhere (module level or inside functions)"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None: mods = [a.name for a in node.names]       # from . import x
            elif node.level == 1: mods = [node.module.split(".")[0]]                             # from .x import y
            elif node.module == PKG: mods = [a.name for a in node.names]                         # from pkg import x
            elif node.module and node.module.startswith(PKG + "."): mods = [node.module.split(".")[1]]
            else: mods = []
        elif isinstance(node, ast.Import):
            mods = [a.name.split(".")[1] for a in node.names if a.name.startswith(PKG + ".")]
        else: continue
        out |= {m for m in mods if m in names}
    return out


def code_lines(tree: ast.AST, src: str) -> int:
    "Lines that hold code: not blank, not comments, not docstrings"
    doc = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            doc |= set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i, l in enumerate(src.splitlines(), 1) if l.strip() and not l.strip().startswith("#") and i not in doc)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    "One cycle per strongly connected component of more than one module (or a module importing itself)"
    index, low, stack, on, found, n = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
        for w in sorted(graph[v]):
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1 or v in graph[v]: found.append(sorted(comp))
    for v in sorted(graph):
        if v not in index: visit(v)
    return found


def main() -> int:
    mods = modules()
    names = set(mods)
    graph, problems = {}, []
    for name, path in mods.items():
        src = path.read_text()
        tree = ast.parse(src)
        graph[name] = imported(tree, names)
        if name not in COMMANDS and graph[name] & COMMANDS:
            problems.append(f"{PKG}/{name}.py imports the command module(s) {sorted(graph[name] & COMMANDS)}: move what it needs to a library module")
        n = code_lines(tree, src)
        if n > MAX_LINES: problems.append(f"{PKG}/{name}.py has {n} code lines (at most {MAX_LINES}): split it by concern")
    for comp in cycles(graph):
        problems.append(f"import cycle between {', '.join(comp)}: " + "; ".join(f"{m} imports {sorted(graph[m] & set(comp))}" for m in comp))
    for p in problems: print(p)
    print(f"layers: {len(mods)} modules, {sum(len(v) for v in graph.values())} imports between them, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
