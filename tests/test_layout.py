"""The house rules, checked: imports run one way (models at the bottom, tune at the top), models/ has no import
circle (the families import the specs, the registry imports the families), and the training path never branches on
the model family (the task knows it)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A module may import vitray modules of its own top-level part or of a lower rank, never of a higher one.
RANK = {
    "models": 0, "storage": 0, "ray_logs": 0, "faults": 0,
    "config": 1, "accounting": 1, "data": 1,
    "checkpoints": 2,
    "tasks": 3, "runs": 3,
    "cost": 4, "eval": 4,
    "train": 5,
    "tune": 6,
}


def _modules():
    for folder, _, files in os.walk(os.path.join(ROOT, "vitray")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__"), path


def _imports(path: str):
    """Every vitray module a file imports, at module level or inside functions (`from vitray import x` → vitray.x)."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vitray":
            if node.module == "vitray":
                yield from (f"vitray.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "vitray")


def _part(module: str) -> str:
    return module.split(".")[1]


def test_imports_run_one_way():
    wrong = []
    for module, path in _modules():
        if module == "vitray":
            continue
        assert _part(module) in RANK, f"{module}: give its part a rank in this test"
        for target in _imports(path):
            if target == "vitray" or _part(target) == _part(module):
                continue
            if RANK[_part(target)] >= RANK[_part(module)]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_training_path_does_not_branch_on_the_model_family():
    """launch, loop, engine and checkpoint ask the task (vitray/tasks) instead of testing the family."""
    for name in ("launch", "loop", "engine", "checkpoint", "metrics"):
        text = open(os.path.join(ROOT, "vitray", "train", f"{name}.py")).read()
        for needle in ('"detr"', '"igpt"', '"vit"', '"bit"', ".family"):
            assert needle not in text, f"vitray/train/{name}.py mentions {needle}"


def _models_imports(module: str, path: str):
    """The vitray.models modules one file of models/ imports, at module level or inside functions, resolved to the
    module (`from vitray.models import vit` → vitray.models.vit; relative imports too)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def test_models_have_no_import_circle():
    """The families (vit, resnet, detr, igpt, ...) import the specs, never the registry; the registry imports them.
    Function-level imports count: a circle there still ties the files together."""
    modules = {m: p for m, p in _modules() if m == "vitray.models" or m.startswith("vitray.models.")}
    graph = {m: sorted({t for t in _models_imports(m, p) if t in modules and t != m}) for m, p in modules.items()}
    circles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                circles.append(" → ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles in vitray/models:\n" + "\n".join(circles)
