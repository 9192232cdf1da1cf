"""The one filesystem layer for workdirs and outputs: etils `epath`, on local disk or `gs://`.

`epath.Path` serves local paths with Python's `os`, and `gs://` (also `s3://`,
`az://`) with `tf.io.gfile` when TensorFlow is installed, else with fsspec
(`gcsfs`; `EPATH_USE_TF=false` selects it even with TensorFlow). Orbax
writes checkpoints through the same paths (TensorStore for the arrays). Every
file the project writes under a workdir or to an output path goes through
here or through `epath` directly, never through `open()` or `os.path`.

Cloud Storage objects can neither be appended to nor renamed atomically, so
there files that grow (metrics.jsonl, TensorBoard event files) are rewritten whole
(`write_bytes`), and a directory is moved file by file (`move`): on local disk through a temporary file and a rename (a kill
never leaves a torn file), elsewhere in one upload (which is atomic).
"""
import io
import os
from typing import Callable, Dict, Union

from absl import flags
from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")  # the URL schemes epath serves
PathLike = Union[str, epath.Path]


def is_local(path: PathLike) -> bool:
    return not str(path).startswith(REMOTE_PREFIXES)


def absolute(path: PathLike) -> epath.Path:
    """A path as the user wrote it (relative to the working directory, `~/...`, absolute
    or a URL) as the absolute epath.Path it means; a URL is left as it is.

    Every path a command or config takes goes through here once, where it enters: Orbax's
    background save refuses relative paths, and a `~` that no shell expanded (a quoted
    flag, a config file) would otherwise name a directory called `~`. Symbolic links are
    kept, so the path printed is the one the user recognises.
    """
    if not is_local(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def absolute_flags(*names: str) -> None:
    """Replace each named absl string flag that is set by its `absolute` form: a command's
    path flags resolved once, right after parsing, so every later use and message agrees."""
    for name in names:
        flag = flags.FLAGS[name]
        if flag.value:
            flag.value = str(absolute(flag.value))


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replace the file at `path` with `data`, all or nothing."""
    path = epath.Path(path)
    if is_local(path):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    else:
        path.write_bytes(data)


def write_encoded(path: PathLike, save: Callable[[io.BytesIO], None]) -> None:
    """Write what `save(buffer)` encodes (e.g. PIL's `Image.save`, `np.savez`) to `path`,
    creating its directory."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    save(buffer)
    write_bytes(path, buffer.getvalue())


def files_under(directory: PathLike) -> Dict[str, epath.Path]:
    """{relative name: path} of every file under `directory` (epath has no recursive glob)."""
    root = epath.Path(directory)
    files, directories = {}, [root]
    while directories:
        for path in directories.pop().iterdir():
            if path.is_dir():
                directories.append(path)
            else:
                files[str(path.relative_to(root))] = path
    return files


def move(source: PathLike, target: PathLike) -> None:
    """Move a directory. Cloud Storage has no directories and no rename: there every file is
    copied, then the source deleted (a directory marker alone would not make `target`'s
    parent exist for a rename)."""
    source, target = epath.Path(source), epath.Path(target)
    if is_local(source):
        source.rename(target)
        return
    for name, path in files_under(source).items():
        path.copy(target / name)
    source.rmtree()
