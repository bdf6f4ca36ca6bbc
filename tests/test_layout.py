"""The house rules, checked: imports run one way (models at the bottom, tune at the top), models/ has no import
circle (the families import the specs, the registry imports the families), and nothing outside tasks/ and models/
branches on the model family (the spec and the task know it)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A module may import vitray modules of its own top-level part or of a lower rank, never of a higher one.
RANK = {
    "models": 0, "storage": 0, "ray_logs": 0, "faults": 0,
    "config": 1, "accounting": 1, "data": 1,
    "checkpoints": 2, "session": 2,
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
