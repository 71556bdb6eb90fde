"""The package's layers and its import graph (README, Layout).

- import-linter checks the contracts of pyproject.toml [tool.importlinter] (layers, the optimizers'
  public API, private modules, no benchmark/model/data module in the library);
- grimp, import-linter's graph library, finds import cycles: a layers contract does not see one
  between a package's __init__ and one of its own modules;
- a fresh interpreter shows what ``import fusedmf`` really loads, run-time imports included.

Each check runs in a child interpreter with this checkout first on the path, so that it reads
this checkout's sources whichever fusedmf the test process imported.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "pyproject.toml")
# benchmark, model and data modules: tools that use the library, never part of it
TOOLS = ("fusedmf.bench", "fusedmf.models", "fusedmf.data")


def require(module: str) -> None:
    """import-linter (and grimp with it) is installed by scripts/env.sh. Machines whose Python comes
    with torch and no network (the GPU images) may lack it: skipped there, naming why. In CI
    (CI=true) a missing one is an error, as for expecttest in tests/test_torch_optim_db.py."""
    if importlib.util.find_spec(module) is not None:
        return
    why = f"{module} is not importable (scripts/env.sh installs import-linter, which brings grimp)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI=true requires it", pytrace=False)
    pytest.skip(why)


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts():
    require("importlinter")
    # lint-imports itself, reading pyproject.toml from the checkout's root, without a cache written
    # into the tree (the contract types used need import-linter 2.17 or newer: scripts/env.sh)
    proc = run_python("import sys; from importlinter.cli import lint_imports_command; "
                      "sys.argv = ['lint-imports', '--no-cache', '--no-logo']; lint_imports_command()")
    if proc.returncode != 0:
        pytest.fail("import-linter: contracts of pyproject.toml [tool.importlinter] are broken "
                    f"(exit status {proc.returncode}):\n{proc.stdout}{proc.stderr}", pytrace=False)


_FIND_CYCLES = textwrap.dedent("""
    import json, sys
    import grimp

    graph = grimp.build_graph("fusedmf", "triton_kernels", cache_dir=None)
    # Tarjan's strongly connected components over the direct imports
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def visit(v):
        work = [(v, iter(sorted(graph.find_modules_directly_imported_by(v))))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        scc.append(w)
                        if w == node:
                            break
                    if len(scc) > 1:
                        sccs.append(sorted(scc))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)

    def line(a, b):
        return ",".join(str(d["line_number"]) for d in graph.get_import_details(importer=a, imported=b)) or "?"

    cycles = {}
    for scc in sccs:  # the shortest cycle through each module of a component, each cycle once
        for a in scc:
            chains = [[a] + list(graph.find_shortest_chain(importer=b, imported=a))
                      for b in sorted(graph.find_modules_directly_imported_by(a)) if b in scc]
            chain = min(chains, key=len)
            start = chain.index(min(chain[:-1]))
            key = tuple(chain[start:-1] + chain[:start])
            cycles[key] = " -> ".join(f"{x} (l.{line(x, y)})" for x, y in zip(chain, chain[1:])) + f" -> {a}"
    print(json.dumps({"modules": len(graph.modules), "cycles": sorted(cycles.values())}))
""")


def test_no_import_cycles():
    require("grimp")
    proc = run_python(_FIND_CYCLES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["modules"] > 50, found  # the graph really is this package's
    if found["cycles"]:
        pytest.fail("import cycles in fusedmf (importer (line of the import) -> imported); move the shared "
                    "piece down a layer:\n  " + "\n  ".join(found["cycles"]), pytrace=False)


def test_import_fusedmf_loads_no_tools():
    proc = run_python("import json, sys, fusedmf; "
                      "print(json.dumps([fusedmf.__file__, sorted(m for m in sys.modules if m.startswith('fusedmf'))]))")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path, loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert os.path.samefile(path, os.path.join(ROOT, "fusedmf", "__init__.py")), path
    tools = [m for m in loaded if any(m == t or m.startswith(t + ".") for t in TOOLS)]
    if tools:
        pytest.fail(f"`import fusedmf` imports benchmark/model/data modules: {tools}", pytrace=False)
