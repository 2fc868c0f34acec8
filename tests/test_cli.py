import subprocess
import sys

from diffbio_eqx import cli


def test_help_lists_commands(capsys):
    try:
        cli.main(["--help"])
    except SystemExit as exit:
        assert exit.code == 0
    assert "info" in capsys.readouterr().out


def test_info_prints_versions_and_devices(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "diffbio_eqx 0.1.0" in out
    assert "jax device: cpu:0" in out


def test_console_script_runs():
    completed = subprocess.run([sys.executable, "-m", "diffbio_eqx.cli", "info"], capture_output=True, text=True,
                               check=False)
    assert completed.returncode == 0, completed.stderr
    assert "jax backend" in completed.stdout


NOT_INSTALLED = """
import importlib.metadata as metadata
import sys
installed = metadata.version
def version(name):
    if name == "diffbio_eqx":
        raise metadata.PackageNotFoundError(name)
    return installed(name)
metadata.version = version
import diffbio_eqx
from diffbio_eqx import cli
print(diffbio_eqx.__version__)
cli.main(["--version"])
"""


def test_a_checkout_on_pythonpath_imports_without_package_metadata():
    # benchmarks/gpu.sh runs the checkout from PYTHONPATH, where no distribution metadata exists: the import
    # raised PackageNotFoundError before (found on the first GPU machine lent)
    completed = subprocess.run([sys.executable, "-c", NOT_INSTALLED], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == ["unknown (not installed)", "diffbio-eqx unknown (not installed)"]


def test_run_help_lists_the_input_flags(capsys):
    try:
        cli.main(["run", "--help"])
    except SystemExit as exit:
        assert exit.code == 0
    out = capsys.readouterr().out
    for flag in ("--layer", "--use-raw", "--allow-non-integer", "--gene-key", "--batch-key", "--label-key"):
        assert flag in out


def test_warnings_print_as_one_line_without_a_source_path(capsys, monkeypatch):
    import warnings

    def warn(_):
        warnings.warn("adata.X: holds non-integer values", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "_info", warn)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["info"]) == 0
    assert capsys.readouterr().err == "diffbio-eqx: warning: adata.X: holds non-integer values\n"


def test_info_and_the_report_share_one_versions_list(capsys):
    from diffbio_eqx._report import VERSIONED, package_versions

    assert {"diffbio_eqx", "jax", "jaxlib", "equinox", "optax", "numpy", "anndata"} <= set(VERSIONED)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name, version in package_versions().items():
        assert f"\n{name} {version}\n" in out
