"""The package's import graph: no cycle, and every import points down the declared stack.

Read with `ast` from the source (imports inside functions included), so a lazy import that
dodges a cycle at run time still counts. The same stack is drawn in docs/design.md's "Layout: the import stack".
A module may import modules of its own layer or below, never above.
"""

import ast
import itertools
import os

# bottom to top; docs/design.md's Layout lists the same layers
STACK = [
    ("quant", "runtime"),
    ("errors", "signals"),
    ("cli", "config", "rundir"),
    ("tokenizer", "layers", "parallel", "launch", "head"),
    ("lora", "optim", "data", "chat"),
    ("model", "prepare"),
    ("step", "pretrained", "serving", "sampling", "evaluate", "benchmark", "checkpoint", "memory", "monitor"),
    ("loading",),
    ("start", "lowering", "server"),
    ("trainer",),
]
ROOT = os.path.join(os.path.dirname(__file__), "..", "jaxgpt")
LAYER = {m: i for i, layer in enumerate(STACK) for m in layer}


def imports(module: str) -> set[str]:
    """The jaxgpt modules `module` imports, anywhere in its source."""
    with open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jaxgpt.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxgpt":
            if node.module == "jaxgpt":  # from jaxgpt import data, lora
                out |= {a.name for a in node.names}
            else:
                out.add(node.module.split(".")[1])
    return out - {module}


def modules() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f != "__init__.py")


def test_every_module_is_placed_in_the_stack():
    assert set(modules()) == set(LAYER), "add the new module to STACK here, to docs/design.md's Layout and to the README's Files"


def test_imports_point_down_the_stack():
    up = [f"{m} ({LAYER[m]}) imports {d} ({LAYER[d]})" for m in modules() for d in sorted(imports(m))
          if LAYER[d] > LAYER[m]]
    assert not up, "imports that point up the stack: " + "; ".join(up)


def test_no_import_cycle():
    graph = {m: imports(m) for m in modules()}
    reach = {m: set(graph[m]) for m in graph}
    for _ in graph:  # transitive closure, small enough to do by repetition
        for m, r in reach.items():
            r |= set(itertools.chain.from_iterable(reach[d] for d in list(r)))
    cycles = sorted(m for m in graph if m in reach[m])
    assert not cycles, f"modules on an import cycle: {', '.join(cycles)}"
