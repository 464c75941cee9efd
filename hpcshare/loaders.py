"""Input sources: learn an array's metadata, then read it straight into a window.

SOURCE strings:

- ``path.npy``: a NumPy file, read with its header's offset, no staging copy;
- ``path.h5:/dataset`` (also .hdf5, .hdf, .he5, .nc, .nc4): an HDF5 dataset,
  read with h5py's ``read_direct`` (chunked and compressed datasets too);
- ``module:function`` or ``path.py:function``: a function called with no
  arguments on one rank; it returns an array, or a :class:`Fill` that
  describes the array and fills the shared buffer it is given.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InputError
from .importing import import_file
from .layout import memory_order

__all__ = [
    "TABLE_SUFFIXES",
    "ArrayMeta",
    "Fill",
    "Source",
    "TableSource",
    "check_dtype",
    "check_shape",
    "source_for",
    "split_range",
    "table_source_for",
]

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".nc", ".nc4")
_NAME_OK = "letters, digits, '_', '-' and '.'"


@dataclasses.dataclass(frozen=True)
class ArrayMeta:
    """Shape, dtype and memory order of an input."""

    shape: tuple[int, ...]
    dtype: np.dtype
    order: str = "C"
    #: where the data starts in the file (.npy)
    data_offset: int = 0
    #: rows that slab boundaries keep together (an HDF5 dataset's chunk rows)
    align_rows: int = 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Fill:
    """What a function source returns to fill the shared buffer itself.

    ``fill(out)`` receives a writable array of ``shape`` and ``dtype`` (in
    ``order``) that lives in the node's shared window, and writes the data into
    it: the input never exists in private memory.

    Examples
    --------
    >>> def make_grid():
    ...     rng = np.random.default_rng(0)
    ...     return Fill((4096, 4096), "f8", lambda out: rng.random(out=out))
    """

    shape: tuple[int, ...]
    dtype: Any
    fill: Callable[[np.ndarray], Any]
    order: str = "C"


def _without_metadata(dtype: np.dtype) -> np.dtype:
    """``dtype`` without the metadata h5py attaches (it does not survive a compact pickle)."""
    if dtype.fields is not None:
        names = list(dtype.names or ())
        return np.dtype(
            {
                "names": names,
                "formats": [_without_metadata(dtype.fields[n][0]) for n in names],
                "offsets": [dtype.fields[n][1] for n in names],
                "itemsize": dtype.itemsize,
            }
        )
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return np.dtype((_without_metadata(base), shape))
    return np.dtype(dtype.str) if dtype.metadata else dtype


def check_shape(name: str, shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """Refuse negative dimensions and sizes no address space can hold (local)."""
    if any(d < 0 for d in shape):
        raise InputError(f"input {name!r} ({where}) has shape {shape}: dimensions must be 0 or more")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > sys.maxsize:
        raise InputError(
            f"input {name!r} ({where}) has shape {shape} of {dtype}: {nbytes} bytes, more than "
            "any machine can map; is the shape right?"
        )


def check_dtype(name: str, dtype: np.dtype, where: str) -> None:
    """Refuse dtypes that cannot live in shared memory (local)."""
    if dtype.hasobject:
        raise InputError(
            f"input {name!r} ({where}) has dtype {dtype}, which holds Python objects "
            "(pointers into one process's heap) and cannot live in shared memory. "
            "Convert it to a fixed-size dtype first: fixed-width strings ('S16', 'U16') "
            "instead of variable-length ones, numbers instead of objects."
        )


def _valid_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "_-." for c in name):
        raise InputError(f"input name {name!r} is not valid: use {_NAME_OK}")


class Source:
    """Base class of input sources.

    ``describe`` runs on world rank 0. A ``parallel`` source (a file) is then
    read by every node's readers, each calling ``read_slab`` for its own part;
    any other source is written once by ``fill`` on world rank 0 and copied to
    the other nodes over MPI.
    """

    name: str
    text: str
    #: whether the node's ranks may read disjoint parts in parallel
    parallel: bool = True

    def describe(self) -> ArrayMeta:
        raise NotImplementedError

    def slabs(self, meta: ArrayMeta, n: int) -> list[tuple[int, int]]:
        """Split the input into at most ``n`` disjoint byte ranges (local)."""
        return split_range(meta.nbytes, n, 1 << 16)

    def read_slab(self, meta: ArrayMeta, out: np.ndarray, start: int, stop: int) -> None:
        """Read bytes ``start:stop`` of the array into ``out`` (the whole window, uint8)."""
        raise NotImplementedError

    def fill(self, meta: ArrayMeta, out: np.ndarray) -> None:
        """Write the whole array into ``out`` (the window, uint8), on the rank that described it."""
        raise NotImplementedError


def split_range(total: int, n: int, align: int) -> list[tuple[int, int]]:
    """Cut ``range(total)`` into at most ``n`` ranges whose inner bounds are multiples of ``align``."""
    if total <= 0:
        return []
    step = -(-total // max(n, 1))
    step = -(-step // align) * align
    return [(a, min(a + step, total)) for a in range(0, total, step)]


def _npy_header_via_memmap(name: str, path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    try:
        mm = np.load(path, mmap_mode="r")
    except ValueError as exc:  # object dtypes cannot be memory-mapped
        raise InputError(
            f"input {name!r} ({path}) cannot be placed: {exc}. Store it with a fixed-size dtype."
        ) from None
    try:
        fortran = memory_order(mm) == "F"
        return tuple(mm.shape), fortran, mm.dtype, int(mm.offset)
    finally:
        mm._mmap.close()


class NpySource(Source):
    """A ``.npy`` file, read from its header's data offset straight into the window."""

    def __init__(self, name: str, path: str, text: str) -> None:
        self.name, self.path, self.text = name, path, text

    def describe(self) -> ArrayMeta:
        from numpy.lib import format as npformat

        try:
            with open(self.path, "rb") as f:
                version = npformat.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = npformat.read_array_header_1_0(f)
                    offset = f.tell()
                elif version == (2, 0):
                    shape, fortran, dtype = npformat.read_array_header_2_0(f)
                    offset = f.tell()
                else:  # 3.0: a UTF-8 header, which only NumPy's own reader decodes
                    shape, fortran, dtype, offset = _npy_header_via_memmap(self.name, self.path)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise InputError(
                f"input {self.name!r}: file {self.path!r} does not exist "
                f"(cwd {os.getcwd()}); give a path every rank can read"
            ) from None
        except (OSError, ValueError) as exc:
            raise InputError(
                f"input {self.name!r}: {self.path!r} is not a readable .npy file: {exc}"
            ) from None
        check_dtype(self.name, dtype, self.path)
        check_shape(self.name, tuple(shape), dtype, self.path)
        meta = ArrayMeta(tuple(shape), dtype, "F" if fortran and len(shape) > 1 else "C", data_offset=offset)
        if size < offset + meta.nbytes:
            raise InputError(
                f"input {self.name!r}: {self.path!r} is truncated: its header says "
                f"{meta.nbytes} data bytes, the file holds {size - offset}"
            )
        return meta

    def read_slab(self, meta: ArrayMeta, out: np.ndarray, start: int, stop: int) -> None:
        view = memoryview(out)[start:stop]  # type: ignore[arg-type]
        with open(self.path, "rb", buffering=0) as f:
            fd = f.fileno()
            pos = 0
            while pos < len(view):
                got = os.preadv(fd, [view[pos : pos + (1 << 26)]], meta.data_offset + start + pos)
                if got <= 0:
                    raise InputError(f"input {self.name!r}: {self.path!r} ended early (was it truncated?)")
                pos += got


class Hdf5Source(Source):
    """An HDF5 dataset, read with ``Dataset.read_direct`` into the window."""

    def __init__(self, name: str, path: str, dataset: str, text: str) -> None:
        self.name, self.path, self.dataset, self.text = name, path, dataset, text

    def _open(self) -> Any:
        import h5py

        try:
            return h5py.File(self.path, "r")
        except FileNotFoundError:
            raise InputError(
                f"input {self.name!r}: file {self.path!r} does not exist "
                f"(cwd {os.getcwd()}); give a path every rank can read"
            ) from None
        except OSError as exc:
            raise InputError(f"input {self.name!r}: cannot open {self.path!r} as HDF5: {exc}") from None

    def describe(self) -> ArrayMeta:
        import h5py

        with self._open() as f:
            obj = f.get(self.dataset)
            if not isinstance(obj, h5py.Dataset):
                found: list[str] = []
                f.visititems(lambda n, o: found.append("/" + n) if isinstance(o, h5py.Dataset) else None)
                what = "is a group, not a dataset" if obj is not None else "does not exist"
                listing = ", ".join(found[:20]) or "none"
                raise InputError(
                    f"input {self.name!r}: dataset {self.dataset!r} {what} in {self.path!r}; "
                    f"datasets there: {listing}. Write the source as {self.path}:/path/to/dataset"
                )
            if obj.shape is None:
                raise InputError(
                    f"input {self.name!r}: dataset {self.dataset!r} in {self.path!r} is empty (null dataspace)"
                )
            dtype = obj.dtype
            check_dtype(self.name, dtype, f"{self.path}:{self.dataset}")
            check_shape(self.name, tuple(obj.shape), dtype, f"{self.path}:{self.dataset}")
            return ArrayMeta(
                tuple(obj.shape), _without_metadata(dtype), "C", align_rows=obj.chunks[0] if obj.chunks else 1
            )

    @staticmethod
    def _row_bytes(meta: ArrayMeta) -> int:
        return meta.nbytes // meta.shape[0]

    def slabs(self, meta: ArrayMeta, n: int) -> list[tuple[int, int]]:
        # Whole rows, aligned to the dataset's chunks so no chunk is decompressed twice.
        if not meta.shape or meta.nbytes == 0:
            return [(0, meta.nbytes)] if meta.nbytes else []
        rows = split_range(meta.shape[0], n, meta.align_rows)
        rb = self._row_bytes(meta)
        return [(a * rb, b * rb) for a, b in rows]

    def read_slab(self, meta: ArrayMeta, out: np.ndarray, start: int, stop: int) -> None:
        arr = out[: meta.nbytes].view(meta.dtype).reshape(meta.shape)
        with self._open() as f:
            ds = f[self.dataset]
            if not meta.shape:
                ds.read_direct(arr)
                return
            rb = self._row_bytes(meta)
            a, b = start // rb, stop // rb
            ds.read_direct(arr, source_sel=np.s_[a:b], dest_sel=np.s_[a:b])


class FunctionSource(Source):
    """A function called on one rank; its array is copied (or filled) into the window."""

    parallel = False

    def __init__(
        self, name: str, target: str, func: str, text: str, obj: Callable[[], Any] | None = None
    ) -> None:
        self.name, self.target, self.func, self.text = name, target, func, text
        self._obj = obj
        self._result: np.ndarray | Fill | None = None

    def _load(self) -> Callable[[], Any]:
        if self._obj is not None:
            return self._obj
        if self.target.endswith(".py"):
            if not os.path.isfile(self.target):
                raise InputError(
                    f"input {self.name!r}: file {self.target!r} does not exist (cwd {os.getcwd()})"
                )
            modname = "_hpcshare_src_" + "".join(c if c.isalnum() else "_" for c in self.target)
            try:
                module = import_file(self.target, modname)
            except Exception as exc:
                raise InputError(
                    f"input {self.name!r}: importing {self.target!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
        else:
            try:
                module = importlib.import_module(self.target)
            except ImportError as exc:
                raise InputError(
                    f"input {self.name!r}: cannot import module {self.target!r} ({exc}); "
                    "install it, add its folder to PYTHONPATH, or write path/to/file.py:function"
                ) from exc
        func = getattr(module, self.func, None)
        if not callable(func):
            raise InputError(f"input {self.name!r}: {self.target!r} has no function {self.func!r}")
        return func

    def describe(self) -> ArrayMeta:
        func = self._load()
        try:
            result = func()
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # sys.exit() in a source too
            raise InputError.from_failure(self.name, f"{self.text} raised", exc) from exc
        if isinstance(result, Fill):
            dtype = np.dtype(result.dtype)
            shape = tuple(int(s) for s in np.atleast_1d(np.asarray(result.shape, dtype=np.int64)))
            order = result.order.upper()
            if order not in ("C", "F"):
                raise InputError(f"input {self.name!r}: Fill order must be 'C' or 'F', got {result.order!r}")
            check_dtype(self.name, dtype, self.text)
            check_shape(self.name, shape, dtype, self.text)
            self._result = result
            return ArrayMeta(shape, dtype, order if len(shape) > 1 else "C")
        if isinstance(result, np.ma.MaskedArray):
            raise InputError(
                f"input {self.name!r}: {self.text} returned a masked array; its mask would be "
                "lost. Return the data and the mask as two inputs (np.ma.getdata, np.ma.getmaskarray)."
            )
        if not isinstance(result, np.ndarray):
            result = self._as_array(result)
        check_dtype(self.name, result.dtype, self.text)
        self._result = result
        return ArrayMeta(result.shape, result.dtype, memory_order(result))

    def _as_array(self, result: Any) -> np.ndarray:
        """A function's non-array result as an array, or an error saying what it returned (local).

        Only a list, tuple or scalar of numbers, bools or strings of one kind
        becomes an array; NumPy would make a dict, None or a generator an
        object array, and a list mixing numbers and strings a string array.
        """
        returned = f"input {self.name!r}: {self.text} returned {type(result).__name__}"
        if result is None or isinstance(result, (dict, set, frozenset)) or inspect.isgenerator(result):
            raise InputError(f"{returned}, not an array: return a NumPy array or an hpcshare.Fill")
        try:
            arr = np.asarray(result)
        except Exception as exc:
            raise InputError(f"{returned}, not an array: {exc}") from exc
        if isinstance(result, (list, tuple)) and arr.dtype.kind in "USO":
            kinds = sorted({type(x).__name__ for x in np.asarray(result, dtype=object).reshape(-1).tolist()})
            if len(kinds) > 1:
                raise InputError(
                    f"{returned} mixing {', '.join(kinds)}; NumPy would turn it into {arr.dtype} "
                    "strings. Return an array of one dtype (np.array(values, dtype=...))."
                )
        return arr

    def fill(self, meta: ArrayMeta, out: np.ndarray) -> None:
        """Write the data into ``out`` (the window's bytes) on the rank that described it."""
        arr = out[: meta.nbytes].view(meta.dtype).reshape(meta.shape, order=meta.order)  # type: ignore[call-overload]
        result, self._result = self._result, None
        if isinstance(result, Fill):
            result.fill(arr)
        elif result is not None:
            np.copyto(arr, result, casting="no")
        else:  # pragma: no cover - describe() always runs first
            raise RuntimeError("fill() before describe()")


def source_for(name: str, text: Any) -> Source:
    """A :class:`Source` for input ``name`` from a SOURCE string or a callable (local)."""
    _valid_name(name)
    if callable(text):
        module = getattr(text, "__module__", "?")
        qualname = getattr(text, "__qualname__", repr(text))
        return FunctionSource(name, module, qualname, f"{module}:{qualname}", obj=text)
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if not isinstance(text, str) or not text:
        raise InputError(f"input {name!r}: SOURCE must be a non-empty string, got {text!r}")
    path, colon, rest = text.rpartition(":")
    if colon and rest.startswith("/") and path.lower().endswith(HDF5_SUFFIXES):
        return Hdf5Source(name, path, rest, text)
    if text.lower().endswith(HDF5_SUFFIXES):
        raise InputError(
            f"input {name!r}: {text!r} names an HDF5 file but no dataset; write {text}:/path/to/dataset"
        )
    if colon and rest and path.lower().endswith(HDF5_SUFFIXES):  # d.h5:group/x
        raise InputError(
            f"input {name!r}: the dataset of {text!r} must be an absolute path in the file; write {path}:/{rest}"
        )
    if text.lower().endswith(".npy"):
        return NpySource(name, text, text)
    if colon and path and rest.isidentifier():
        return FunctionSource(name, path, rest, text)
    raise InputError(
        f"input {name!r}: cannot tell what kind of source {text!r} is. Use path.npy, "
        "path.h5:/dataset, module:function or path.py:function, or a table: path.parquet, "
        "path.csv, path.arrow (path.arrow:table for an Arrow table)"
    )


# --- tables: DataFrames and Arrow tables placed at launch (hpcshare.put's path) ------

ARROW_FILE_SUFFIXES = (".arrow", ".feather", ".ipc")
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", *ARROW_FILE_SUFFIXES)
_AS_TABLE = ":table"


@dataclasses.dataclass(frozen=True)
class TableSource:
    """An input read as a pandas DataFrame (or, with ``:table``, an Arrow table).

    Placed once per node after MPI is up, through the same path as
    :func:`hpcshare.put`. Arrow IPC files read as tables are copied straight
    into shared memory; Parquet, CSV, and DataFrames made from Arrow files
    pass through the reading rank's private memory once.
    """

    name: str
    path: str
    text: str
    as_table: bool

    @property
    def arrow_file(self) -> bool:
        return self.path.lower().endswith(ARROW_FILE_SUFFIXES)

    def file_bytes_shared(self) -> bool:
        """Whether the file's bytes go into shared memory as they are (local, on the reading rank).

        True for an uncompressed Arrow IPC file read as a table. A compressed
        one (Feather's default, lz4) is warned about: it is decompressed on
        the reading rank, not zero-copy from the file.
        """
        if not self.arrow_file:
            return False
        try:
            compressed = arrow_file_compressed(self.path)
        except Exception as exc:
            raise self._fail(exc) from exc
        if compressed:
            then = (
                "and shared decompressed"
                if self.as_table
                else "before it is made a DataFrame (as a table input, path:table, its bytes would be shared as they are)"
            )
            warnings.warn(
                f"input {self.name!r}: {self.path} is a compressed Arrow/Feather file (lz4 or zstd, "
                f"Feather's default): it is decompressed on the reading rank {then}, not zero-copy "
                "from the file. Write it uncompressed to share its bytes as they are: "
                "df.to_feather(path, compression='uncompressed') or "
                "pyarrow.feather.write_feather(table, path, compression='uncompressed').",
                RuntimeWarning,
                stacklevel=2,
            )
        return self.as_table and not compressed

    def _fail(self, exc: BaseException) -> InputError:
        return InputError(f"input {self.name!r} ({self.text}): {type(exc).__name__}: {exc}")

    def check(self) -> None:
        """Refuse a missing file or missing pandas/pyarrow before anything starts (local)."""
        if not os.path.isfile(self.path):
            raise InputError(f"input {self.name!r}: {self.path!r} does not exist or is not a file")
        try:
            import pyarrow  # noqa: F401

            if not self.as_table:
                import pandas  # noqa: F401
        except ImportError as exc:
            raise InputError(
                f"input {self.name!r}: reading {self.text!r} needs pandas and pyarrow: "
                "pip install 'hpcshare[dataframe]'"
            ) from exc

    def load(self) -> Any:
        """The DataFrame or Arrow table, in this process's memory (local)."""
        try:
            return self._load()
        except InputError:
            raise
        except Exception as exc:
            raise self._fail(exc) from exc

    def _load(self) -> Any:
        import pyarrow as pa

        lower = self.path.lower()
        if lower.endswith(ARROW_FILE_SUFFIXES):
            with pa.memory_map(self.path) as f:
                table = pa.ipc.open_file(f).read_all()
        elif lower.endswith(".csv"):
            import pyarrow.csv

            table = pyarrow.csv.read_csv(self.path)
        else:
            import pyarrow.parquet

            table = pyarrow.parquet.read_table(self.path)
        if self.as_table:
            return table
        return table.to_pandas()


def arrow_file_compressed(path: str) -> bool:
    """Whether the Arrow IPC file at ``path`` has compressed buffers (read from its first batch) (local)."""
    import pyarrow as pa

    with pa.memory_map(path) as f:
        reader = pa.ipc.open_file(f)
        if reader.num_record_batches == 0:
            return False
        f.seek(0)
        whole = f.read_buffer()  # the map itself, no copy
        lo, hi = whole.address, whole.address + whole.size
        batch = reader.get_batch(0)
        return any(
            not (lo <= b.address < hi)
            for column in batch.columns
            for b in column.buffers()
            if b is not None and b.size
        )


def table_source_for(name: str, text: Any) -> TableSource | None:
    """A :class:`TableSource` if ``text`` names a Parquet, Arrow IPC or CSV file, else None (local)."""
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if not isinstance(text, str):
        return None
    path, as_table = (text[: -len(_AS_TABLE)], True) if text.endswith(_AS_TABLE) else (text, False)
    if not path.lower().endswith(TABLE_SUFFIXES):
        return None
    _valid_name(name)
    return TableSource(name, path, text, as_table)
