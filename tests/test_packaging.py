"""A torch-only core: the base install declares torch, numpy and Triton only, every package the
code imports is declared by the base or an extra, and a missing extra names itself."""

import ast
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DIST_OF = {"yaml": "pyyaml"}


def _dist(requirement: str) -> str:
    """'jsonargparse[signatures]>=4.27' -> 'jsonargparse'"""
    name = requirement.split(";")[0].strip()
    for sep in "[<>=!~ ":
        name = name.split(sep)[0]
    return name.lower()


def _extra(name: str) -> set:
    """The distributions an extra brings, its own `sparsetrain[...]` references followed."""
    out = set()
    for req in PYPROJECT["project"]["optional-dependencies"][name]:
        if req.startswith("sparsetrain["):
            for inner in req[len("sparsetrain["):req.index("]")].split(","):
                out |= _extra(inner.strip())
        else:
            out.add(_dist(req))
    return out


def _third_party_imports() -> dict:
    """{top-level module: [files]} for every import in sparsetrain/ (lazy ones inside functions too)
    that is neither the standard library nor sparsetrain."""
    stdlib = set(sys.stdlib_module_names)
    found = {}
    for path in (ROOT / "sparsetrain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top != "sparsetrain":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_base_install_is_torch_numpy_triton():
    assert {_dist(r) for r in PYPROJECT["project"]["dependencies"]} == {"torch", "numpy", "triton"}


def test_every_imported_package_is_declared_and_the_app_extra_has_all():
    base = {_dist(r) for r in PYPROJECT["project"]["dependencies"]}
    app = _extra("app")
    undeclared = {m: files for m, files in _third_party_imports().items() if DIST_OF.get(m, m) not in base | app}
    assert not undeclared, f"imported but in no extra: {undeclared}"
    assert {"lightning", "transformers", "accelerate"} <= app
    assert _extra("lightning") == {"lightning"} and _extra("hf") == {"transformers", "accelerate"}
    assert app <= _extra("dev") and {"pytest", "hypothesis"} <= _extra("dev")
    # the extras' table the error messages use agrees with pyproject
    from sparsetrain._extras import PROVIDED_BY

    for module, extra in PROVIDED_BY.items():
        assert DIST_OF.get(module, module) in _extra(extra), (module, extra)


def _run(code: str, blocked) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where the ``blocked`` modules cannot be imported."""
    prelude = f"import sys\nfor _m in {list(blocked)!r}: sys.modules[_m] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300)


def test_core_loop_runs_without_any_extra():
    # the same script CI runs in a venv holding only the base install
    res = subprocess.run([sys.executable, str(ROOT / ".ci" / "core_check.py"), "--block-extras"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exported exactly 2:4, SparseGPT pruned them 2:4, none of 12 extra packages imported" in res.stdout


@pytest.mark.parametrize("name, blocked, extra", [
    ("SparseTraining", ["lightning"], "lightning"),
    ("SparseTrainerCallback", ["transformers"], "hf"),
    ("CausalLMModule", ["lightning"], "app"),
    ("TextDataModule", ["lightning"], "app"),
])
def test_public_name_of_a_missing_extra_names_it(name, blocked, extra):
    res = _run(f"import sparsetrain as st\ntry:\n    st.{name}\nexcept ModuleNotFoundError as e:\n"
               f"    print('NAME', e.name); print('MSG', e)\n", blocked)
    assert res.returncode == 0, res.stderr
    assert f"NAME {blocked[0]}" in res.stdout
    assert f"MSG sparsetrain.{name} needs the {extra} extra (`{blocked[0]}` not installed): " \
           f"pip install 'sparsetrain[{extra}]'" in res.stdout


def test_a_real_import_error_inside_sparsetrain_is_not_renamed(monkeypatch):
    # only a missing optional package becomes the extra's message; any other missing module stays as it is
    from sparsetrain._extras import from_import_error

    assert from_import_error(ModuleNotFoundError("No module named 'sparsetrain.nope'", name="sparsetrain.nope"),
                             "x") is None
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = from_import_error(ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"), "plots")
    assert err.name == "matplotlib" and "pip install 'sparsetrain[app]'" in str(err)


@pytest.mark.parametrize("argv, missing", [
    (["fit", "--config", "recipes/tiny-s-ste.yaml"], "jsonargparse"),
    (["fit", "--help"], "lightning"),
    (["export", "--ckpt", "x", "--out", "y"], "transformers"),
    (["report", "runs"], "matplotlib"),
])
def test_cli_without_the_app_extra_says_which_extra(monkeypatch, capsys, argv, missing):
    from sparsetrain.cli import main

    monkeypatch.setitem(sys.modules, missing, None)  # find_spec now returns None: as if not installed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"sparsetrain {argv[0]}: error: `sparsetrain {argv[0]}` needs the app extra (`{missing}` not "
                   f"installed): pip install 'sparsetrain[app]'")
    # --debug raises it, as a ModuleNotFoundError naming the package
    with pytest.raises(ModuleNotFoundError, match=r"needs the app extra") as info:
        main([*argv, "--debug"])
    assert info.value.name == missing


def test_optimal_transposable_masks_without_scipy_name_it():
    res = _run("import torch\nfrom sparsetrain.ops import transposable_mask\n"
               "print(transposable_mask(torch.rand(8, 8), 2, 4, method='tsenor').sum().item())\n"
               "transposable_mask(torch.rand(8, 8), 2, 4, method='optimal')\n", ["scipy"])
    assert res.stdout.strip() == "32", res.stderr  # the torch methods run without SciPy
    assert "`method`='optimal' needs SciPy, which is not installed: pip install scipy" in res.stderr


def test_prune_without_tqdm_prunes_and_warns_only_when_a_bar_was_asked_for():
    code = """
import warnings, torch
from torch import nn
from sparsetrain import prune
for progress in (False, True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        prune(model, [torch.randn(16, 8)], method="magnitude", refine_steps=0, targets=r"^0$", progress=progress)
    w = model[0].weight.detach().reshape(8, 2, 4)
    print(progress, int((w != 0).sum(-1).max()), [str(x.message) for x in seen if "tqdm" in str(x.message)])
"""
    res = _run(code, ["tqdm"])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "False 2 []"
    # with progress=True: the per-layer line still prints, then the warning names tqdm
    assert lines[1].startswith("  0 [8x8]: rel.err ")
    assert lines[2].startswith("True 2 ['`progress`=True needs tqdm, which is not installed (pip install tqdm)")
