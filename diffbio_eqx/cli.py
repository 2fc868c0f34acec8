"""The `diffbio-eqx` command line."""

import argparse
import importlib.metadata
import platform
import sys
from collections.abc import Sequence


_VERSIONED = ("diffbio_eqx", "jax", "jaxlib", "equinox", "optax", "jaxtyping", "beartype", "numpy", "scipy",
              "anndata")


def _info(_: argparse.Namespace) -> int:
    import jax

    print(f"python {platform.python_version()} ({sys.executable})")
    for name in _VERSIONED:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name} {version}")
    print(f"jax backend: {jax.default_backend()}")
    for device in jax.devices():
        print(f"jax device: {device.platform}:{device.id} {device.device_kind}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffbio-eqx",
        description="Differentiable single-cell RNA-seq workflows in pure JAX.",
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('diffbio_eqx')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="print package versions and the JAX devices")
    info.set_defaults(handler=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if getattr(arguments, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return arguments.handler(arguments)
    except ValueError as error:
        print(f"diffbio-eqx: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
