"""The one atomic file writer: every save (training checkpoints, models, pipelines, AnnData, figures) goes through
`atomic_path`, so a crash or kill while writing never leaves a half-written file under the target's name.
"""

import contextlib
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import equinox as eqx
from jaxtyping import PyTree


def temporary_path(path: str | os.PathLike[str]) -> pathlib.Path:
    """The temporary file `atomic_path` writes before renaming: `.<name>.tmp` in the target's folder."""
    target = pathlib.Path(path)
    return target.with_name(f".{target.name}.tmp")


def plain_file_mode() -> int:
    """The permission bits `open()` gives a new file: `0o666` less the process umask (`0o644` under umask 022)."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `path`; on success flush it to disk and rename it over `path`, on failure
    remove it. The file gets the mode a plain `open()` would give it (`plain_file_mode`).

    The temporary name is fixed (`temporary_path`), so a file left by a writer that was killed is overwritten and
    renamed by the next write of the same target rather than piling up; one writer per target at a time.

    **Arguments:**

    - `path`: the file to write; its folder must exist and be writable.

    **Returns:** a context manager yielding the temporary `pathlib.Path` to write to.
    """
    target = pathlib.Path(path)
    directory = target.parent if str(target.parent) else pathlib.Path(".")
    if not directory.is_dir():
        raise ValueError(f"output: folder {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"output: folder {str(directory)!r} is not writable")
    if target.is_dir():  # a file is never renamed over a folder, not even by root
        raise ValueError(f"output: {str(target)!r} is a folder; give the path of a file to write")
    temporary = temporary_path(target)
    try:
        yield temporary
        with open(temporary, "rb+") as written:  # on disk before the rename, so a crash never leaves it empty
            os.fsync(written.fileno())
        os.chmod(temporary, plain_file_mode())  # a writer's private mode (e.g. 0600) is not the file's
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_leaves(
    path: str | os.PathLike[str], tree: PyTree, *, header: Mapping[str, Any] | None = None
) -> pathlib.Path:
    """Write `tree`'s leaves (`eqx.tree_serialise_leaves`) atomically, after a JSON `header` line if given.

    **Arguments:**

    - `path`: the file to write.
    - `tree`: any PyTree (a model, a training state).
    - `header`: JSON-serialisable settings needed to rebuild a template of `tree` when loading (`read_header`).
      (Keyword only argument.)

    **Returns:** `path` as a `pathlib.Path`.
    """
    target = pathlib.Path(path)
    with atomic_path(target) as temporary, open(temporary, "wb") as handle:
        if header is not None:
            handle.write((json.dumps(dict(header)) + "\n").encode())
        eqx.tree_serialise_leaves(handle, tree)
    return target


def read_header(handle: Any) -> dict[str, Any]:
    """Read the JSON header line `save_leaves` wrote from an open binary file; leaves the file at the leaves."""
    return json.loads(handle.readline().decode())


def load_leaves(
    path: str | os.PathLike[str], *, format: str, template: Callable[[dict[str, Any]], PyTree], field: str = "path",
    what: str = "a saved model",
) -> tuple[PyTree, dict[str, Any]]:
    """Read a file `save_leaves` wrote with `header["format"] == format`: `(tree, header)`, the leaves read into
    `template(header)`. Anything else (a missing, truncated or empty file, another format, another model's
    leaves) is a `ValueError` naming `field` and the file."""
    source = pathlib.Path(path)
    if not source.is_file():
        raise ValueError(f"{field}: {str(source)!r} does not exist or is not a file")
    try:
        with open(source, "rb") as handle:  # a handle: Equinox would add ".eqx" to a path without a suffix
            header = read_header(handle)
            if not isinstance(header, dict) or header.get("format") != format:
                raise ValueError(f"format {header.get('format') if isinstance(header, dict) else None!r}, "
                                 f"expected {format!r}")
            return eqx.tree_deserialise_leaves(handle, template(header)), header
    except Exception as error:  # noqa: BLE001 - whatever the file holds, the user gets one named error
        raise ValueError(f"{field}: {str(source)!r} could not be read as {what} ({type(error).__name__}: {error}); "
                         "it may be truncated, another kind of file, or written for another model") from None
