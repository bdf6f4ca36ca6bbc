"""The house rules, checked: imports run one way (models at the bottom, tune at the top) and, inside a folder,
between sibling modules too; nothing outside tasks/ and models/ branches on the model family (the spec and the
task know it)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A module may import vitray modules of its own top-level part or of a lower rank, never of a higher one.
RANK = {
    "models": 0, "storage": 0, "ray_logs": 0, "faults": 0,
    "config": 1, "accounting": 1, "data": 1, "goodput": 1,
    "checkpoints": 2, "session": 2,
    "tasks": 3, "runs": 3,
    "cost": 4, "paper_cost": 4, "eval": 4,
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
    """Every vitray module a file imports, at module level, inside functions or for type checking only
    (`from vitray.data import jpeg` → vitray.data.jpeg; `from vitray.data.shards import x` → vitray.data.shards)."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vitray":
            for a in node.names:
                target = f"{node.module}.{a.name}"
                yield target if _is_module(target) else node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "vitray")


def _is_module(name: str) -> bool:
    path = os.path.join(ROOT, *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


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


# What names a model family. Outside vitray/tasks and vitray/models a fact about a family is asked of its spec
# (`vitray.models.specs`: kind, has_pre_logits_default, has_attention_maps, embeds_patches_linearly, backbone_spec)
# or of its task (`vitray.tasks`), never read off its name.
FAMILY_NEEDLES = ('"detr"', '"igpt"', '"vit"', '"bit"', '"hybrid"', ".family")

# Where a family's name may still appear outside tasks/ and models/: presentation, never a branch. Each entry is
# (file, the needle in its context) → why; the test fails when a context is gone, so the list cannot go stale.
PRESENTATION = {
    ("vitray/tune/run.py", '"family": get_spec(cfg.model.name).family'):
        "the study's results table has a family column (results.csv; the fits group by it)",
    ("vitray/tune/trial.py", '"family": get_spec(cfg.model.name).family'):
        "the same column, in the row each trial reports",
    ("vitray/tune/scaling.py", '"vit": ("tab:blue", "o", "ViT")'): "Figure 5's colour, marker and label per family",
    ("vitray/tune/scaling.py", '"bit": ("tab:orange", "s", "BiT ResNet")'): "Figure 5's colour, marker and label",
    ("vitray/tune/scaling.py", '"hybrid": ("tab:green", "^", "Hybrid")'): "Figure 5's colour, marker and label",
    ("vitray/config/checks.py", '{cfg.model.name} ({spec.family})"'):
        "the decode_on refusal names the family (the branch asks spec.kind)",
    ("vitray/eval/inspect.py", "a {model.spec.family} model embeds patches with a ResNet"):
        "the refusal and the report name the family (the branch asks spec.embeds_patches_linearly)",
    ("vitray/checkpoints.py", '"family": spec.family'):
        "describe() reports the family for messages (inspection's refusal names it); callers branch on its spec",
}


# Folders whose modules still import each other in a circle, and why they are let through for now. Once a folder
# is clean, drop it here and the test keeps it clean.
CIRCLES_ALLOWED = {
}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph` (module → the modules it imports): its strongly connected components of more
    than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_folder_has_an_import_circle():
    """Sibling modules import each other one way only, counting imports inside functions and for type checking: a
    circle means neither module can be read, tested or moved without the other (and an import inside a function
    only hides it). A folder's `__init__.py` counts as one of its modules."""
    files = dict(_modules())
    folders: dict[str, dict[str, set[str]]] = {}
    for module, path in files.items():
        folder = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, "/")
        folders.setdefault(folder, {})[module] = set()
    for folder, graph in folders.items():
        for module in graph:
            graph[module] = {t for t in _imports(files[module]) if t in graph and t != module}
    found = {folder: _circles(graph) for folder, graph in folders.items()}
    wrong = [f"{folder}: a circle among {', '.join(c)}" for folder, cs in sorted(found.items()) for c in cs
             if folder not in CIRCLES_ALLOWED]
    assert not wrong, "import circles:\n" + "\n".join(wrong)
    assert set(CIRCLES_ALLOWED) <= set(folders), "CIRCLES_ALLOWED names a folder that is gone"


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_training_path_does_not_branch_on_the_model_family():
    """Every module outside vitray/tasks and vitray/models — the training path, config, accounting, the planner,
    checkpoints, evaluation, studies — asks the spec or the task instead of testing the family."""
    found = []
    for module, path in _modules():
        if module != "vitray" and _part(module) in ("tasks", "models"):
            continue
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        text = open(path).read()
        for (file, context), _why in PRESENTATION.items():
            if file == rel:
                assert context in text, f"{rel} no longer holds {context!r}: drop it from PRESENTATION"
                text = text.replace(context, "")
        found += [f"{rel} mentions {needle}" for needle in FAMILY_NEEDLES if needle in text]
    assert not found, "\n".join(found)
