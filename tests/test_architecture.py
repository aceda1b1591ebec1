"""The shape of the code: one place per method, arrows that only point down."""
import ast
import importlib
from pathlib import Path

import pytest

from conftest import invoke

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["cache", "data", "stages", "pipeline"]  # each may import only itself and the ones before it


def _modules():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            yield layer, path


def test_no_module_imports_a_higher_layer():
    wrong = []
    for layer, path in _modules():
        allowed = set(LAYERS[:LAYERS.index(layer) + 1])
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.split(".")[0]
                if top in LAYERS and top not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, wrong


def test_method_names_appear_only_in_the_methods_module():
    from stages.methods import METHODS
    found = []
    for _, path in _modules():
        if path == ROOT / "stages" / "methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in METHODS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} '{node.value}'")
    assert not found, found


def test_a_new_method_is_one_class(run_copy, monkeypatch):
    """Registering a class is all it takes: the CLI offers it, its hyperparameter becomes an
    option, and distill and evaluate run it."""
    from stages import methods

    class Smoothed(methods.ERM):
        name = "smoothed"
        hparams = {**methods.ERM.hparams, "smoothing": 0.1}

        def loss(self, logits, b):
            import torch.nn.functional as F
            return F.cross_entropy(logits, b.labels, label_smoothing=self.hp["smoothing"])

    monkeypatch.setitem(methods.METHODS, Smoothed.name, Smoothed)
    monkeypatch.setitem(methods.HPARAM_HELP, "smoothing", "Label smoothing.")
    import pipeline.cli
    try:
        importlib.reload(pipeline.cli)
        assert "--smoothing" in invoke("distill", "--help").output
        trained = invoke("distill", "--run", run_copy, "--method", "smoothed", "--holdout", "photo",
                         "--student", "test_resnet", "--student-weights", "none", "--student-size", 32,
                         "--smoothing", 0.2, "--steps", 2, "--per-domain", 2, "--eval-every", 2, "--workers", 0)
        assert trained.exit_code == 0, trained.output
        config = (run_copy / "distill" / "smoothed").rglob("config.json")
        assert '"smoothing": 0.2' in next(config).read_text()
        scored = invoke("evaluate", "--run", run_copy, "--method", "smoothed", "--holdout", "photo", "--workers", 0)
        assert scored.exit_code == 0, scored.output
        assert '"method": "smoothed"' in scored.output
    finally:
        monkeypatch.undo()
        importlib.reload(pipeline.cli)


def test_student_kinds_are_known_only_to_the_methods_module():
    """Stages and the protocol call the method; none of them asks what kind of student it has."""
    kinds = {"BACKBONE", "TEACHER", "TEACHER_TOWER"}
    found = []
    for _, path in _modules():
        if path == ROOT / "stages" / "methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else \
                None
            if name in kinds or (isinstance(node, ast.Attribute) and node.attr == "student"
                                 and isinstance(node.value, ast.Attribute) and node.value.attr == "method"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not found, found


RUN_FOLDER_NAMES = {"extract", "features", "align", "distill", "evaluate", "pixels", "shards", "skipped.jsonl",
                    "queries.json", "received.npz", "results.jsonl", "table.md", "protocol.json", "demo-data",
                    "teacher.h5", "index.parquet"}


def test_run_folder_paths_are_built_in_the_layout_module_only():
    """No module but stages/runfolder.py joins a run-folder name onto a path (``x / "pixels"``).
    One named exception: cache/store.py's damage message finds the run folder above a damaged file
    (by its ``extract`` folder) and the bottom layer cannot import the layout."""
    allowed = {ROOT / "stages" / "runfolder.py", ROOT / "cache" / "store.py"}
    found = []
    for _, path in _modules():
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                for side in (node.left, node.right):
                    if isinstance(side, ast.Constant) and side.value in RUN_FOLDER_NAMES:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} '{side.value}'")
    assert not found, found


@pytest.mark.parametrize("name", ["extract", "align", "distill", "evaluate", "pixels"])
def test_every_stage_is_one_stage_object(name):
    """Each stage module defines a Stage subclass of its own (an imported one does not count); the
    runner is the only manifest writer."""
    from stages.stage import Stage
    module = importlib.import_module(f"stages.{name}")
    assert any(isinstance(v, type) and issubclass(v, Stage) and v is not Stage and v.__module__ == module.__name__
               for v in vars(module).values())
    writers = [p.relative_to(ROOT).as_posix() for _, p in _modules() if "manifest.write(" in p.read_text()]
    assert writers == ["stages/stage.py"]
