"""The `diffbio-eqx` command line."""

import argparse
import pathlib
import platform
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any, TextIO


def _info(_: argparse.Namespace) -> int:
    import jax

    from ._report import package_versions

    print(f"python {platform.python_version()} ({sys.executable})")
    for name, version in package_versions().items():
        print(f"{name} {version}")
    print(f"jax backend: {jax.default_backend()}")
    for device in jax.devices():
        print(f"jax device: {device.platform}:{device.id} {device.device_kind}")
    return 0


def _run(arguments: argparse.Namespace) -> int:
    from ._job import InputSettings, run_job
    from ._job_steps import JobSteps

    if arguments.input is None and arguments.batch_key is not None:
        raise ValueError("--batch-key: needs an INPUT file (the bundled example has a simulated 'batch' column)")
    if arguments.input is None and (arguments.layer is not None or arguments.use_raw):
        raise ValueError(f"{'--layer' if arguments.layer is not None else '--use-raw'}: needs an INPUT file (the "
                         "bundled example holds its counts in X)")
    inputs = InputSettings(layer=arguments.layer, use_raw=arguments.use_raw, gene_key=arguments.gene_key,
                           allow_non_integer=arguments.allow_non_integer)
    epochs = {name: value for name, value in (("vae_epochs", arguments.vae_epochs),
                                                ("ambient_epochs", arguments.ambient_epochs),
                                                ("umap_epochs", arguments.umap_epochs)) if value is not None}
    result = run_job(
        arguments.input, batch_key=arguments.batch_key, label_key=arguments.label_key, out_dir=arguments.out,
        config_path=arguments.config, seed=arguments.seed, progress=not arguments.quiet, epochs=epochs,
        inputs=inputs,
        steps=JobSteps(doublets=arguments.doublets, impute=arguments.impute, reference=arguments.reference,
                       annotation_mode=arguments.annotation_mode, markers=arguments.markers,
                       solo_epochs=arguments.solo_epochs, batch_correction=arguments.batch_correction),
    )
    print(f"diffbio-eqx: results in {result.out_dir.resolve()}")
    for name, path in result.files.items():
        print(f"  {name:9s} {path}")
    for name, value in result.metrics.items():
        print(f"  {name}: {value:.3f}")
    return 0


def _annotate(arguments: argparse.Namespace) -> int:
    import pathlib

    import jax.random as jr
    import pandas as pd

    from . import tl
    from ._job_steps import JobSteps, check_steps
    from .io import check_layer, not_counts, read_h5ad, write_h5ad

    out = pathlib.Path(arguments.out or pathlib.Path(arguments.query).with_suffix("").name + "_annotated.h5ad")
    for option, path in (("--reference", arguments.reference), ("--markers", arguments.markers)):
        if path is not None and pathlib.Path(path).resolve() == out.resolve():
            raise ValueError(f"--out: {str(out)!r} would overwrite the {option} file; choose another name")
    if arguments.majority_voting and arguments.mode != "celltypist":
        raise ValueError(f"--majority-voting: only for --mode celltypist (the mode is {arguments.mode!r})")
    # The reference (raw counts, its label column) and the markers, checked as `diffbio-eqx run` checks them.
    annotator = check_steps(JobSteps(reference=arguments.reference, annotation_mode=arguments.mode,
                                     markers=arguments.markers), arguments.label_key, mode_flag="--mode")
    assert annotator is not None  # a mode is always given here
    query = read_h5ad(arguments.query)
    if arguments.layer is not None:
        check_layer(query, arguments.layer)
    message = not_counts(query, layer=arguments.layer, flags=True)
    if message is not None:
        raise ValueError(f"QUERY {arguments.query}: {message}")
    options: dict = {"markers": annotator.markers} if annotator.markers is not None else {}
    if arguments.majority_voting:
        options["majority_voting"] = True
    result = tl.annotate(query, annotator.mode, reference=annotator.reference, label_key=annotator.label_key,
                         layer=arguments.layer, key=jr.key(arguments.seed), **options)
    write_h5ad(query, out, input_path=arguments.query)
    counts = pd.Series(result.labels).value_counts()
    print(f"diffbio-eqx: {query.n_obs} cells annotated ({annotator.mode}) in {out.resolve()}")
    for name, n in counts.items():
        print(f"  {name}: {n}")
    return 0


#: Environment variable naming the folder of JAX's persistent compilation cache (`none` turns it off).
COMPILATION_CACHE_ENV = "DIFFBIO_EQX_COMPILATION_CACHE"


def compilation_cache_dir(option: str | None = None) -> pathlib.Path | None:
    """Where the command line keeps JAX's compiled programs: `--compilation-cache DIR`, else
    `$DIFFBIO_EQX_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/diffbio-eqx/jax` (`~/.cache/diffbio-eqx/jax`); None
    when the option or the variable is `none`."""
    import os

    chosen = option if option is not None else os.environ.get(COMPILATION_CACHE_ENV)
    if chosen is not None and chosen.strip().lower() in ("none", ""):
        return None
    if chosen is not None:
        return pathlib.Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "diffbio-eqx" / "jax"


def enable_compilation_cache(option: str | None = None) -> pathlib.Path | None:
    """Switch on JAX's persistent compilation cache in `compilation_cache_dir(option)` for every compile that
    takes any time at all (JAX's default keeps only compiles over 1 s, which leaves most of a job's programs out),
    so a second run of the same job loads its programs instead of compiling them. Returns the folder (None: off)."""
    import jax

    folder = compilation_cache_dir(option)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--compilation-cache: cannot create {str(folder)!r} ({error})") from None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    """A seed NumPy and JAX both take: a whole number in [0, 2**32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, 2**32), got {value}")
    return value


def _add_cache_flag(command: argparse.ArgumentParser) -> None:
    command.add_argument("--compilation-cache", metavar="DIR|none",
                         help="folder of JAX's persistent compilation cache, so a second run compiles nothing "
                              f"(default: ${COMPILATION_CACHE_ENV}, else $XDG_CACHE_HOME/diffbio-eqx/jax, i.e. "
                              "~/.cache/diffbio-eqx/jax); none: off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffbio-eqx",
        description="Differentiable single-cell RNA-seq workflows in pure JAX.",
    )
    from . import __version__  # "unknown (not installed)" for a checkout on PYTHONPATH

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="print package versions and the JAX devices")
    info.set_defaults(handler=_info)
    _add_run_command(commands)
    _add_annotate_command(commands)
    return parser


def _add_run_command(commands: Any) -> None:
    run = commands.add_parser(
        "run", help="train the whole pipeline on a dataset and write result.h5ad, umap.png, training.png, report.md",
        description="Train ambient removal, VAE, Harmony, parametric UMAP and clustering on INPUT and write "
                    "the results. Without INPUT, runs on the bundled 10x PBMC 68k set with a simulated "
                    "two-batch split (the set has no real batches).",
    )
    run.add_argument("input", nargs="?", metavar="INPUT.h5ad", help="cells x genes raw counts (default: PBMC 68k)")
    run.add_argument("--layer", metavar="NAME",
                     help="read the counts from layers[NAME] (e.g. counts, scvi-tools' convention) instead of X")
    run.add_argument("--use-raw", action="store_true", help="read the counts from .raw (scanpy's convention)")
    run.add_argument("--allow-non-integer", action="store_true",
                     help="run on a matrix that is not counts (e.g. log-normalised X), saying so in the report, "
                          "instead of refusing it")
    run.add_argument("--gene-key", metavar="K",
                     help="var column naming the genes (e.g. symbols instead of Ensembl IDs; default var_names)")
    run.add_argument("--batch-key", metavar="K", help="obs column with each cell's batch")
    run.add_argument("--batch-correction", choices=("harmony", "mmd", "adversarial", "none"),
                     help="batch corrector: Harmony on the VAE latent, trVAE's MMD or a WGAN-GP critic while the "
                          "VAE trains, or none (default: the config's, harmony)")
    run.add_argument("--label-key", metavar="K", help="obs column with known cell types (for ARI/NMI in the report)")
    run.add_argument("--out", metavar="DIR", default="out", help="output folder (default: out)")
    run.add_argument("--config", metavar="FILE", help="JSON or TOML file of SingleCellPipelineConfig settings")
    run.add_argument("--seed", type=_seed, default=0, help="random seed (same seed, same result)")
    run.add_argument("--vae-epochs", type=_positive_int, help="VAE epochs (default: scVI's heuristic)")
    run.add_argument("--ambient-epochs", type=_positive_int,
                     help="ambient model epochs (default: CellBender's 150; up to 300 below 1,400 cells)")
    run.add_argument("--umap-epochs", type=_positive_int,
                     help="parametric UMAP epochs (default: about 3,000 optimiser steps)")
    run.add_argument("--quiet", action="store_true",
                     help="no progress (otherwise bars on a terminal, plain lines when stderr is redirected)")
    _add_cache_flag(run)
    run.add_argument("--doublets", metavar="METHOD",
                     help="scrublet|solo|none: call doublets on every cell first and fit the pipeline on the others "
                          "(default: the config's doublet_filter, none)")
    run.add_argument("--solo-epochs", type=_positive_int,
                     help="Solo classifier's most epochs (default: SOLO's 400, with early stopping)")
    run.add_argument("--impute", metavar="METHOD",
                     help="magic|none: write MAGIC's imputed expression as layers['magic'] (default: the config's "
                          "imputation, none; the VAE still models the counts)")
    run.add_argument("--reference", metavar="REF.h5ad",
                     help="annotate the cells from this labelled reference (raw counts in X; labels in its "
                          "obs[--label-key]): obs['cell_type'], obs['cell_type_confidence']")
    run.add_argument("--annotation-mode", metavar="MODE",
                     help="celltypist|scanvi|cellassign (default with --reference: celltypist)")
    run.add_argument("--markers", metavar="FILE",
                     help="cellassign: CSV of 0/1 (marker genes x cell types) or JSON {type: [genes]}")
    run.set_defaults(handler=_run)


def _add_annotate_command(commands: Any) -> None:
    annotate = commands.add_parser(
        "annotate", help="annotate cell types of QUERY.h5ad from a labelled reference or marker genes",
        description="Write obs['cell_type'], obs['cell_type_confidence'] and obsm['cell_type_probabilities'] of "
                    "QUERY (raw counts) to a new h5ad file: CellTypist-style logistic regression or scANVI trained on "
                    "REF.h5ad's --label-key, or CellAssign with --markers.",
    )
    annotate.add_argument("query", metavar="QUERY.h5ad", help="cells x genes raw counts to annotate")
    annotate.add_argument("--reference", metavar="REF.h5ad", help="labelled reference cells (raw counts)")
    annotate.add_argument("--label-key", metavar="KEY", help="the reference's obs column of cell types")
    annotate.add_argument("--mode", choices=("celltypist", "scanvi", "cellassign"), default="celltypist",
                          help="annotator (default: celltypist)")
    annotate.add_argument("--markers", metavar="FILE",
                          help="cellassign: CSV of 0/1 (marker genes x cell types) or JSON {type: [genes]}")
    annotate.add_argument("--majority-voting", action="store_true", help="celltypist: vote over over-clusters")
    annotate.add_argument("--layer", metavar="NAME", help="read counts from layers[NAME] instead of X")
    annotate.add_argument("--out", metavar="FILE", help="output h5ad (default: QUERY_annotated.h5ad here)")
    annotate.add_argument("--seed", type=_seed, default=0, help="random seed")
    _add_cache_flag(annotate)
    annotate.set_defaults(handler=_annotate)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """A warning as one line of the command's own, without Python's source path and line."""
    del category, filename, lineno, line
    print(f"diffbio-eqx: warning: {message}", file=file or sys.stderr)


def _terminate(signum: int, frame: Any) -> None:
    del signum, frame
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if getattr(arguments, "handler", None) is None:
        parser.print_help()
        return 2
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python takes signals
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None  # unwinds as Ctrl-C does
    try:
        if hasattr(arguments, "compilation_cache"):  # before anything compiles
            enable_compilation_cache(arguments.compilation_cache)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return arguments.handler(arguments)
    except KeyboardInterrupt:
        print("diffbio-eqx: interrupted; nothing was written", file=sys.stderr)
        return 130
    except ValueError as error:  # bad input or settings: the message names the field
        print(f"diffbio-eqx: error: {error}", file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as error:  # numerical failure or the file system; nothing is left behind
        print(f"diffbio-eqx: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
