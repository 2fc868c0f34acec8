"""The house rules (ARCHITECTURE.md): layers and family independence (import-linter), the stage contract on every
public stage, short functions, and a user-level `__init__`."""

import ast
import inspect
import pathlib
import shutil
import subprocess
import sys

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import pytest

import diffbio_eqx as dx
from diffbio_eqx._core._stage import AbstractStage, AbstractTrainableStage


ROOT = pathlib.Path(__file__).resolve().parents[1]
LINT_IMPORTS = pathlib.Path(sys.executable).with_name("lint-imports")
# Each trainable stage and its one way to train.
FIT_FUNCTIONS = {
    "AmbientRemoval": "fit_ambient_removal",
    "VAENormalizer": "fit_vae",
    "ParametricUMAP": "fit_umap",
    "SoftKMeans": "fit_soft_kmeans",
    "GaussianMixture": "fit_gaussian_mixture",
    "CellAssign": "fit_cellassign",
    "SCANVI": "fit_scanvi",
    "MaskedGeneTransformer": "fit_masked_gene_transformer",
    "STAGATE": "fit_stagate",
    "SpatialNCEM": "fit_ncem",
    "SoloClassifier": "fit_solo_classifier",
}
MAX_LINES, MAX_ARGUMENTS = 80, 10


def _lint_imports(cwd: pathlib.Path, env_path: str | None = None) -> subprocess.CompletedProcess:
    env = None
    if env_path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": env_path}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> pathlib.Path:
    """A copy of the package and its pyproject, first on the path of the `lint-imports` runs below."""
    folder = tmp_path_factory.mktemp("house")
    shutil.copytree(ROOT / "diffbio_eqx", folder / "diffbio_eqx", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    return folder


def _with_line(package: pathlib.Path, module: str, line: str) -> str:
    path = package / "diffbio_eqx" / module
    original = path.read_text()
    path.write_text(original + f"\n{line}\n")
    return original


def test_the_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("_core/_geometry.py", "from .. import io  # an upward import", "Layers"),
        ("_vae/_stage.py", "from .._pipeline import _model  # a family importing the pipeline", "Layers"),
        ("_vae/_stage.py", "from .._umap import _loss  # one family importing another", "Method families"),
        ("_grn/_regression.py", "from .._de import _markers  # one operator family importing another",
         "Operator families"),
        ("_clustering/_gmm.py", "from .._doublets import _scrublet  # a core family importing an operator",
         "Layers"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(package_copy, module, line, broken):
    original = _with_line(package_copy, module, line)
    try:
        result = _lint_imports(package_copy, env_path=str(package_copy))
    finally:
        (package_copy / "diffbio_eqx" / module).write_text(original)
    assert result.returncode != 0
    broken_contracts = [line for line in result.stdout.splitlines() if " BROKEN" in line]
    assert any(line.startswith(broken) for line in broken_contracts), result.stdout[-2000:]


def _public_stage_classes() -> dict[str, type]:
    return {name: obj for name, obj in vars(dx).items()
            if inspect.isclass(obj) and issubclass(obj, AbstractStage) and not name.startswith("Abstract")}


def test_every_public_stage_subclasses_the_abstract_stage_and_is_final():
    stages = _public_stage_classes()
    assert {"AmbientRemoval", "VAENormalizer", "Harmony", "ParametricUMAP", "SoftKMeans"} <= set(stages)
    for name, cls in stages.items():
        assert not inspect.isabstract(cls), name
        assert cls.__subclasses__() == [], f"{name} is subclassed: stages are final"
    # A module with a `__call__` exported to users but outside the contract would slip through the walk above.
    for name, obj in vars(dx).items():
        if inspect.isclass(obj) and issubclass(obj, eqx.Module) and name in {"Harmony", "SoftKMeans"}:
            assert issubclass(obj, AbstractStage), name


def _keyword_only(signature: inspect.Signature, name: str) -> inspect.Parameter:
    parameter = signature.parameters.get(name)
    assert parameter is not None, f"no `{name}` parameter"
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, f"`{name}` is not keyword-only"
    return parameter


@pytest.mark.parametrize("name", sorted(_public_stage_classes()))
def test_call_takes_keyword_only_key_and_inference(name):
    signature = inspect.signature(getattr(dx, name).__call__)
    assert _keyword_only(signature, "key").default is None
    assert _keyword_only(signature, "inference").default is False
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]
    assert positional, "a stage takes its main input positionally"


@pytest.mark.parametrize("name", sorted(_public_stage_classes()))
def test_trainable_stages_have_loss_on_a_batch_and_one_fit_function(name):
    cls = getattr(dx, name)
    if not issubclass(cls, AbstractTrainableStage):
        assert name not in FIT_FUNCTIONS
        return
    signature = inspect.signature(cls.loss)
    parameters = [p for p in signature.parameters.values() if p.name != "self"]
    assert parameters[0].name == "batch" and parameters[0].kind is not inspect.Parameter.KEYWORD_ONLY
    assert _keyword_only(signature, "key").default is inspect.Parameter.empty
    for parameter in parameters[1:]:
        assert parameter.name == "key" or parameter.default is not inspect.Parameter.empty, parameter.name
    fit = getattr(dx, FIT_FUNCTIONS[name])
    fit_signature = inspect.signature(fit)
    assert _keyword_only(fit_signature, "key").default is inspect.Parameter.empty
    assert next(iter(fit_signature.parameters.values())).kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def _small_stages_and_batches() -> dict[str, tuple[AbstractTrainableStage, tuple]]:
    key = jr.key(0)
    counts = jr.poisson(key, 3.0, (16, 12)).astype(jnp.float32)
    batches = jnp.arange(16, dtype=jnp.int32) % 2
    x = jr.normal(key, (16, 4))
    profile = jnp.full((12,), 1 / 12, jnp.float32)
    return {
        "VAENormalizer": (dx.VAENormalizer(12, 2, hidden_dims=(8,), latent_dim=3, key=key), (counts, batches)),
        "AmbientRemoval": (dx.AmbientRemoval(12, latent_dim=2, hidden_dim=8, key=key), (counts, profile)),
        "SoftKMeans": (dx.SoftKMeans(x[:3]), (x,)),
    }


@pytest.mark.parametrize("name", ["VAENormalizer", "AmbientRemoval", "SoftKMeans"])
def test_loss_returns_a_scalar_and_a_dict_of_diagnostics(name):
    stage, batch = _small_stages_and_batches()[name]
    loss, aux = stage.loss(batch, key=jr.key(1))
    assert loss.shape == () and jnp.isfinite(loss)
    assert isinstance(aux, dict) and all(jnp.shape(v) == () for v in aux.values())


def _long_or_wide_functions() -> list[str]:
    found = []
    for path in sorted((ROOT / "diffbio_eqx").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                n_arguments = len([a for a in arguments if a.arg not in ("self", "cls")])
                if lines > MAX_LINES or n_arguments > MAX_ARGUMENTS:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines, "
                                 f"{n_arguments} arguments)")
    return found


def test_no_function_is_longer_than_80_lines_or_takes_more_than_10_arguments():
    assert _long_or_wide_functions() == []


def test_the_top_level_exports_the_user_api_only():
    internals = [name for name in vars(dx) if name.startswith("check_") or name in
                 {"SparseRows", "scvi_optimizer", "data_mesh", "harmony_early_exit", "map_in_chunks"}]
    assert internals == []
    for name in ("fit_pipeline", "run_pipeline", "harmony", "fit_vae", "fit_umap", "fit_soft_kmeans", "pp", "tl",
                 "pl", "neighbor_graph"):
        assert hasattr(dx, name), name
