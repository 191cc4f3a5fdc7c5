"""The library's layers, one way down: every import of every module of `dipddpm` (module level and
inside functions, `importlib.import_module` of a literal name too) goes to its own layer or a
lower one, in the order `dipddpm.LAYERS` lists (read from there, the one place it is written).
Also: the library imports no entry point (`jobs`, `launch`, `bench`), no module of `dipddpm`
sits in an import cycle, and no job imports another job."""
from __future__ import annotations

import ast
from pathlib import Path

from dipddpm import LAYERS
from tests.conftest import REPO

LIB = Path(REPO) / "dipddpm"
ENTRY_POINTS = ("jobs", "launch", "bench", "tests")
# the launcher runs `jobs.<name>` by name at run time (see dipddpm.LAYERS); nothing else may
BY_NAME = {"dipddpm.launch.task"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p, LIB): p for p in sorted(LIB.rglob("*.py"))}


def imports(path: Path, module: str, modules) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth. `from pkg import x`
    counts as importing pkg.x when that is a module of the library, else pkg."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in modules else base))
        elif (isinstance(node, ast.Call) and node.args
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append((node.lineno, arg.value))
            elif isinstance(arg, ast.JoinedStr) and module not in BY_NAME:
                head = arg.values[0] if arg.values else None
                name = head.value if isinstance(head, ast.Constant) else "<dynamic>"
                out.append((node.lineno, f"{name}<by name>"))
    return out


def layer_of(module: str) -> int | None:
    """Index in LAYERS of a library module (None: not placed in any layer)."""
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself: only the version and LAYERS
    for i, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return i
    return None


def library_graph():
    modules = library_modules()
    return modules, {m: imports(p, m, modules) for m, p in modules.items()}


def test_every_module_has_a_layer():
    modules = library_modules()
    assert len(modules) > 40
    assert [m for m in modules if layer_of(m) is None] == [], \
        "place every top-level module or package of dipddpm in dipddpm.LAYERS"
    named = [n for layer in LAYERS for n in layer]
    assert len(named) == len(set(named)), "a name in two layers of dipddpm.LAYERS"


def test_imports_go_one_way_down():
    _, graph = library_graph()
    wrong = []
    for m, edges in graph.items():
        for line, target in sorted(set(edges)):
            top = target.split(".")[0]
            if top in ENTRY_POINTS or "<by name>" in target:
                wrong.append(f"{m}:{line} imports {target} (an entry point)")
            elif top == "dipddpm" and layer_of(target) is not None \
                    and layer_of(target) > layer_of(m):
                wrong.append(f"{m}:{line} imports {target}, a higher layer")
    assert wrong == [], "\n".join(wrong)


def test_no_import_cycles():
    modules, graph = library_graph()
    edges = {m: sorted({t for _, t in graph[m] if t in modules and t != m}) for m in modules}
    # Tarjan's strongly connected components
    index, low, stack, on, cycles, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in modules:
        if v not in index:
            visit(v)
    assert cycles == [], f"modules importing each other: {cycles}"


def test_no_module_imports_a_private_name_of_another():
    """A helper used by two modules is public (`load_split`, not `_load_split`)."""
    wrong = []
    for m, path in library_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or
                                                     (node.module or "").startswith("dipddpm")):
                wrong += [f"{m}:{node.lineno} imports {a.name} from {node.module}"
                          for a in node.names if a.name.startswith("_")
                          and not a.name.startswith("__")]
    assert wrong == [], "\n".join(wrong)


def test_a_job_imports_no_other_job():
    jobs = Path(REPO) / "jobs"
    files = sorted(jobs.glob("*.py"))
    assert len(files) > 5
    wrong = [f"{p.name}:{line} imports {t}" for p in files
             for line, t in imports(p, module_name(p, jobs), {})
             if t.split(".")[0] in ENTRY_POINTS]
    assert wrong == [], "\n".join(wrong)


def test_the_walk_sees_function_level_and_by_name_imports(tmp_path):
    """The checks above can fail: an upward import inside a function, a relative one and an
    import_module of a job are all seen."""
    pkg = tmp_path / "dipddpm" / "data"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text("import importlib\n"
                   "def f():\n    from dipddpm.report import tables\n"
                   "    from ..protocols import arms\n"
                   "    return importlib.import_module('jobs.report')\n")
    targets = [t for _, t in imports(src, "dipddpm.data.x", {})]
    assert targets == ["importlib", "dipddpm.report", "dipddpm.protocols", "jobs.report"]
    assert [layer_of(t) > layer_of("dipddpm.data.x") for t in targets[1:3]] == [True, True]
