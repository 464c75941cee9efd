"""Objects as bytes in one shared file, and back, zero-copy.

:func:`encode` turns a NumPy array, a pandas DataFrame or Series, or a
pyarrow Table, RecordBatch, Array or ChunkedArray into an :class:`Encoded`:
a small header plus the raw buffers, laid out at 64-byte aligned offsets.
:func:`decode` rebuilds the object over a read-only buffer holding those
bytes (the node's shared file) without copying a data buffer.

- NumPy arrays: the header holds shape, dtype and order; the data is one buffer.
- pandas: pickle protocol 5 with out-of-band buffers: numeric, bool,
  nullable, categorical and Arrow-backed columns (strings included) keep
  their buffers out of the pickle. datetime64 and timedelta64 blocks would
  be pickled in band (copied on every load); they go out of band as their
  int64 view and are viewed back.
- Arrow: the Arrow IPC stream format, read back with zero-copy buffer views.

Python objects (object-dtype columns, Python-backed strings) cannot live in
shared memory; :func:`encode` refuses them, naming every such column (and
index) in one error, each with the fix for what it holds. The exception:
categoricals whose categories are Python strings (pandas 2's
``pd.Categorical(strings)``) are shared with the same codes and an
Arrow-backed (``string[pyarrow]``) category index.

Imports nothing from MPI, pandas or pyarrow at module level.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import struct
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import NotShareable
from .layout import PIECE, dtype_from_text, dtype_text, memory_order

__all__ = ["ALIGN", "Encoded", "decode", "describe", "encode"]

ALIGN = 64  # every buffer starts at a multiple of this (cache lines, AVX-512 loads, Arrow's own)
_MAGIC = b"HPCSHR01"
_PREFIX = struct.Struct("<8sQ")  # magic, header length


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclasses.dataclass
class Encoded:
    """An object ready to be written: a header and its buffers, with their places in the file."""

    kind: str  #: "ndarray", "pandas" or "arrow"
    header: bytes  #: the prefix and the pickled header, written at offset 0
    offsets: list[int]  #: where each part starts
    sizes: list[int]  #: each part's bytes
    #: each writes its part into a buffer of its size, calling ``done(n)`` when its first n bytes are final
    writers: list[Callable[[memoryview, Callable[[int], None]], None]]
    summary: str  #: what it is, for messages: "DataFrame 2000000 x 11"

    @property
    def nbytes(self) -> int:
        """Bytes of the whole file."""
        return _align(
            max([len(self.header), *(o + s for o, s in zip(self.offsets, self.sizes, strict=True))])
        )

    def write_into(self, dest: memoryview, written: Callable[[int], None] | None = None) -> None:
        """Write the file's bytes into ``dest`` (writable, at least :attr:`nbytes` long).

        ``written(n)``, if given, is called as the writing goes: the first n
        bytes of ``dest`` are final (a put sends them on while the rest is written).
        """
        dest[: len(self.header)] = self.header
        for offset, size, writer in zip(self.offsets, self.sizes, self.writers, strict=True):
            if size:
                writer(dest[offset : offset + size], _progress_at(offset, written))
        if written is not None:
            written(len(dest))


def _progress_at(offset: int, written: Callable[[int], None] | None) -> Callable[[int], None]:
    if written is None:
        return lambda n: None
    return lambda n: written(offset + n)


def _copier(src: memoryview) -> Callable[[memoryview, Callable[[int], None]], None]:
    def write(dest: memoryview, done: Callable[[int], None]) -> None:
        into, data = np.frombuffer(dest, np.uint8), np.frombuffer(src, np.uint8)
        for a in range(0, len(data), PIECE):
            np.copyto(into[a : a + PIECE], data[a : a + PIECE])
            done(min(a + PIECE, len(data)))

    return write


def _build(kind: str, meta: dict[str, Any], sizes: list[int], writers: list[Any], summary: str) -> Encoded:
    """Lay the parts out after the header; the header records where each is."""
    # the header's length depends on the offsets it holds: size it with generous offsets first
    probe = pickle.dumps({**meta, "kind": kind, "parts": [(2**62, s) for s in sizes]}, protocol=5)
    offset = _align(_PREFIX.size + len(probe))
    offsets = []
    for s in sizes:
        offsets.append(offset)
        offset = _align(offset + s)
    body = pickle.dumps({**meta, "kind": kind, "parts": list(zip(offsets, sizes, strict=True))}, protocol=5)
    header = _PREFIX.pack(_MAGIC, len(body)) + body
    return Encoded(kind, header, offsets, sizes, writers, summary)


# --- NumPy ----------------------------------------------------------------------


def _check_ndarray(a: np.ndarray, where: str) -> None:
    if a.dtype.hasobject:
        raise NotShareable(
            f"{where} has dtype {a.dtype}: Python objects cannot live in shared memory. "
            "Convert it to a fixed-size dtype (numbers, bool, datetime64, fixed-width bytes or str)."
        )


def _strided_copier(a: np.ndarray) -> Callable[[memoryview, Callable[[int], None]], None]:
    """Copy a non-contiguous array (a slice, ``np.broadcast_to``) into C order, a block of rows at a time.

    No contiguous copy of it is ever made in this process: the bytes go
    from the source's strides straight into the destination.
    """

    def write(dest: memoryview, done: Callable[[int], None]) -> None:
        out = np.ndarray(a.shape, a.dtype, buffer=dest)
        row = a.nbytes // a.shape[0]
        step = max(1, PIECE // max(row, 1))
        for i in range(0, a.shape[0], step):
            np.copyto(out[i : i + step], a[i : i + step])
            done(min(i + step, a.shape[0]) * row)

    return write


def _encode_ndarray(a: np.ndarray) -> Encoded:
    _check_ndarray(a, f"array of shape {a.shape}")
    order = memory_order(a)
    if a.flags.c_contiguous or a.flags.f_contiguous:
        flat = a.ravel(order="A").view(np.uint8) if a.size else np.empty(0, np.uint8)  # no copy
        writer = _copier(flat.data)
    else:  # strided: copied into C order as it is written, never first into a private copy
        writer = _strided_copier(a)
    meta = {"shape": a.shape, "dtype": dtype_text(a.dtype), "order": order}
    return _build("ndarray", meta, [a.nbytes], [writer], f"{a.dtype} array {a.shape}")


def _decode_ndarray(header: dict[str, Any], buf: memoryview) -> np.ndarray:
    ((offset, _),) = header["parts"]
    dtype = dtype_from_text(header["dtype"])
    out = np.ndarray(header["shape"], dtype, buffer=buf, offset=offset, order=header["order"])
    out.flags.writeable = False
    return out


# --- pandas -----------------------------------------------------------------------


def _view_as(values: np.ndarray, dtype: Any) -> np.ndarray:
    """Unpickling: a datetime64/timedelta64 array from its int64 view (no copy)."""
    return values.view(dtype)


def _categorical(codes: np.ndarray, categories: Any, ordered: bool) -> Any:
    """Unpickling: a Categorical over shared codes and an Arrow-backed category index (no copy)."""
    import pandas as pd

    dtype = pd.CategoricalDtype(categories, ordered=ordered)
    return pd.Categorical.from_codes(codes, dtype=dtype, validate=False)


def _same(obj: Any) -> Any:
    return obj


def _writable_view(a: np.ndarray) -> np.ndarray | None:
    """A writable view of ``a`` if its memory is writable, else None."""
    view = a.view()
    try:
        view.flags.writeable = True
    except ValueError:
        return None
    return view


class _OutOfBandPickler(pickle.Pickler):
    """Protocol 5 with buffers out of band, datetime-like ones included.

    A Categorical whose categories are Python strings (pandas 2's
    ``pd.Categorical(strings)``) is pickled with the same codes and its
    categories as an Arrow-backed string index, which can be shared.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray:
            if not obj.flags.writeable and obj.size and not obj.dtype.hasobject:
                writable = _writable_view(obj)  # a read-only view of writable memory (Categorical.codes)
                if writable is not None:  # would be loaded read-only: pandas 2 could not write into it
                    return _same, (writable,)
            if obj.dtype.kind in "mM":
                return _view_as, (obj.view(np.int64), obj.dtype)
            if (
                obj.size
                and not obj.dtype.hasobject
                and not (obj.flags.c_contiguous or obj.flags.f_contiguous)
            ):
                return np.ascontiguousarray, (np.ascontiguousarray(obj),)
        elif type(obj).__name__ == "Categorical" and _python_strings(obj.categories):
            arrow = obj.categories.astype(ARROW_STRING)
            return _categorical, (obj.codes, arrow, obj.ordered)
        return NotImplemented


ARROW_STRING = "string[pyarrow]"  #: the string dtype pandas 2 and 3 share without Python objects


def _python_strings(values: Any) -> bool:
    """Whether ``values`` (an Index or array) holds Python str objects only (object or python-string dtype)."""
    import pandas as pd

    dtype = values.dtype
    if isinstance(dtype, pd.StringDtype):
        return dtype.storage == "python"
    return (
        isinstance(dtype, np.dtype)
        and dtype.hasobject
        and pd.api.types.infer_dtype(values, skipna=False) == "string"
    )


# what to write for an object-dtype column, by what pandas infers it holds ({0}: the column)
_OBJECT_FIXES = {
    "string": "{0}.astype('string[pyarrow]')",
    "bytes": "{0}.astype(pd.ArrowDtype(pa.binary()))",
    "integer": "{0}.astype('Int64')",
    "integer-na": "{0}.astype('Int64')",
    "floating": "{0}.astype('Float64')",
    "mixed-integer-float": "{0}.astype('Float64')",
    "boolean": "{0}.astype('boolean')",
    "date": "{0}.astype(pd.ArrowDtype(pa.date32()))",
    "datetime": "pd.to_datetime({0}, utc=True)",
    "decimal": "{0}.astype(pd.ArrowDtype(pa.decimal128(38, 9)))  (your precision and scale)",
    "empty": "{0}.astype('float64')  (it holds only missing values)",
}


def _object_fix(values: Any, target: str) -> str:
    """The fix for an object-dtype column, index or level: what to assign to ``target``."""
    import pandas as pd

    kind = pd.api.types.infer_dtype(values, skipna=True)
    if kind in _OBJECT_FIXES:
        return f"{target} = {_OBJECT_FIXES[kind].format(target)}"
    first = next((v for v in values if v is not None), None)
    if kind == "mixed" and isinstance(first, dict | list | tuple):
        return f"{target} = pd.arrays.ArrowExtensionArray(pa.array({target}.tolist()))  (Arrow structs and lists)"
    return (
        f"give it one type (e.g. {target} = {target}.astype('string[pyarrow]') for text), or leave it "
        "out of the shared frame (.drop(columns=...)); it holds " + kind
    )


def _refusal(values: Any, where: str, target: str) -> str | None:
    """Why a column (or index, or level) cannot be shared, with the fix for its dtype; None if it can."""
    import pandas as pd

    dtype = values.dtype
    if isinstance(dtype, np.dtype):
        if dtype.hasobject:
            return f"{where} has dtype object (Python objects): {_object_fix(values, target)}"
        return None
    if isinstance(dtype, pd.CategoricalDtype):
        return _categories_refusal(dtype.categories, where, target)
    if isinstance(dtype, pd.StringDtype):
        if dtype.storage == "python":
            return (
                f"{where} has dtype {dtype!r} backed by Python str objects: "
                f"{target} = {target}.astype('string[pyarrow]')"
            )
        return None
    if isinstance(dtype, pd.IntervalDtype | pd.SparseDtype):
        sub = dtype.subtype
        if sub is not None and np.dtype(sub).hasobject:
            return f"{where} has dtype {dtype}, over Python objects: convert its values to numbers"
        return None
    if not isinstance(dtype, _zero_copy_dtypes()):
        return (
            f"{where} has dtype {dtype!r}, which hpcshare cannot share: convert it to a NumPy or Arrow dtype"
        )
    return None


def _categories_refusal(categories: Any, where: str, target: str) -> str | None:
    """Why a categorical's categories cannot be shared; None for numbers, datetimes and strings."""
    import pandas as pd

    if _python_strings(categories):
        return None  # shared as an Arrow-backed index (see _OutOfBandPickler)
    if isinstance(categories.dtype, np.dtype) and categories.dtype.hasobject:
        kind = pd.api.types.infer_dtype(categories, skipna=True)
        return (
            f"{where} is a categorical whose categories are Python objects ({kind}): make them "
            f"strings or numbers, e.g. {target} = {target}.cat.rename_categories("
            f"{target}.cat.categories.astype(str))"
        )
    if isinstance(categories.dtype, np.dtype):
        return None
    return _refusal(categories, f"the categories of {where}", f"{target}.cat.categories")


def _zero_copy_dtypes() -> tuple[type, ...]:
    """pandas extension dtypes whose arrays are fixed-size buffers (pickled out of band)."""
    import pandas as pd
    from pandas.core.dtypes.dtypes import BaseMaskedDtype

    return (BaseMaskedDtype, pd.ArrowDtype, pd.DatetimeTZDtype, pd.PeriodDtype)


def _index_refusals(index: Any, what: str, target: str) -> list[str | None]:
    import pandas as pd

    if isinstance(index, pd.MultiIndex):
        return [
            None
            if _refusal(level, "", "") is None
            else (
                f"level {i} of the {what} has dtype {level.dtype} (Python objects): e.g. for text "
                f"{target} = {target}.set_levels({target}.levels[{i}].astype('string[pyarrow]'), level={i})"
            )
            for i, level in enumerate(index.levels)
        ]
    if isinstance(index, pd.RangeIndex):
        return []
    return [_refusal(index, f"the {what}", target)]


def _check_pandas(obj: Any) -> None:
    """Refuse a frame or Series with columns (or index) of Python objects, naming every one with its fix."""
    import pandas as pd

    if isinstance(obj, pd.DataFrame):
        problems = [
            _refusal(col, f"column {name!r} (position {i})", f"df[{name!r}]")
            for i, (name, col) in enumerate(obj.items())
        ]
        problems += _index_refusals(obj.index, "index", "df.index")
    else:
        problems = [_refusal(obj, f"Series {obj.name!r}", "s")]
        problems += _index_refusals(obj.index, "index", "s.index")
    found = [p for p in problems if p is not None]
    if found:
        what = f"{type(obj).__name__} {' x '.join(map(str, obj.shape))}"
        raise NotShareable(
            f"cannot share this {what}: Python objects cannot live in shared memory; "
            f"{len(found)} part(s) hold them. Fix each, then put it again:\n  " + "\n  ".join(found)
        )


def _encode_pandas(obj: Any) -> Encoded:
    _check_pandas(obj)
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _OutOfBandPickler(out, protocol=5, buffer_callback=buffers.append).dump(obj)
    raws = [b.raw() for b in buffers]
    shape = " x ".join(map(str, obj.shape))
    return _build(
        "pandas",
        {"pickle": out.getvalue()},
        [r.nbytes for r in raws],
        [_copier(r) for r in raws],
        f"{type(obj).__name__} {shape}",
    )


def _decode_pandas(header: dict[str, Any], buf: memoryview) -> Any:
    views = [buf[o : o + s] for o, s in header["parts"]]
    return pickle.loads(header["pickle"], buffers=views)


# --- Arrow -------------------------------------------------------------------------


def _as_batch_source(obj: Any) -> tuple[str, Any]:
    """(what it was, a Table or RecordBatch to stream) for any Arrow object."""
    import pyarrow as pa

    if isinstance(obj, pa.Table):
        return "Table", obj
    if isinstance(obj, pa.RecordBatch):
        return "RecordBatch", obj
    if isinstance(obj, pa.ChunkedArray):
        return "ChunkedArray", pa.table({"values": obj})
    return "Array", pa.record_batch({"values": obj})


def _encode_arrow(obj: Any) -> Encoded:
    import pyarrow as pa

    what, data = _as_batch_source(obj)
    sink = pa.MockOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as w:
        w.write(data)
    size = sink.size()

    def write(dest: memoryview, done: Callable[[int], None]) -> None:
        with pa.ipc.new_stream(pa.FixedSizeBufferWriter(pa.py_buffer(dest)), data.schema) as w:
            w.write(data)

    rows = len(obj)
    return _build("arrow", {"what": what}, [size], [write], f"Arrow {what} of {rows} rows")


def _decode_arrow(header: dict[str, Any], buf: memoryview) -> Any:
    import pyarrow as pa

    ((offset, size),) = header["parts"]
    table = pa.ipc.open_stream(pa.py_buffer(buf[offset : offset + size])).read_all()
    what = header["what"]
    if what == "Table":
        return table
    if what == "RecordBatch":
        return (
            table.combine_chunks().to_batches()[0]
            if table.num_rows
            else pa.RecordBatch.from_pylist([], table.schema)
        )
    column = table.column(0)
    if what == "ChunkedArray":
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def encode_arrow_file(path: str) -> Encoded:
    """An Arrow IPC file (Feather v2) as it is: its bytes are read straight into shared memory."""
    import pyarrow as pa

    with pa.memory_map(path) as f:
        reader = pa.ipc.open_file(f)  # refuses what is not an Arrow IPC file, before any allocation
        rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    size = os.path.getsize(path)

    def write(dest: memoryview, done: Callable[[int], None]) -> None:
        with open(path, "rb") as f:
            have = 0
            while have < size:
                n = f.readinto(dest[have : have + PIECE])
                if not n:
                    raise OSError(f"{path} shrank while it was being read")
                have += n
                done(have)

    return _build("arrow-file", {"what": "Table"}, [size], [write], f"Arrow Table of {rows} rows from {path}")


def _decode_arrow_file(header: dict[str, Any], buf: memoryview) -> Any:
    import pyarrow as pa

    ((offset, size),) = header["parts"]
    return pa.ipc.open_file(pa.py_buffer(buf[offset : offset + size])).read_all()


# --- where an object's data lies --------------------------------------------------


def buffer_ranges(obj: Any) -> list[tuple[int, int]]:
    """(address, bytes) of the data buffers of a NumPy array, pandas object or Arrow object (local).

    pandas: every column's arrays and the index's; Arrow: every buffer of
    every chunk. Other objects: none. Nothing is copied.
    """
    kind = _kind(obj)
    if kind == "ndarray":
        return _ndarray_range(obj)
    if kind == "pandas":
        import pandas as pd

        frame = obj.to_frame() if isinstance(obj, pd.Series) else obj
        ranges = [r for _, col in frame.items() for r in _array_ranges(col.array)]
        return ranges + _array_ranges(obj.index.array)
    if kind == "arrow":
        return _arrow_ranges(obj)
    return []


def _ndarray_range(a: np.ndarray) -> list[tuple[int, int]]:
    if not a.nbytes:
        return []
    from numpy.lib.array_utils import byte_bounds

    lo, hi = byte_bounds(a)
    return [(lo, hi - lo)]


def _array_ranges(values: Any) -> list[tuple[int, int]]:
    """The buffers of one pandas array (NumPy-backed, masked, Arrow-backed, categorical)."""
    if isinstance(values, np.ndarray):
        return _ndarray_range(values)
    arrow = getattr(values, "_pa_array", None)
    if arrow is not None:  # Arrow-backed (strings too)
        return _arrow_ranges(arrow)
    ranges: list[tuple[int, int]] = []
    for attr in ("_ndarray", "_data", "_mask"):  # NumPy-backed, datetimes, categorical codes, masked
        inner = getattr(values, attr, None)
        if isinstance(inner, np.ndarray):
            ranges += _ndarray_range(inner)
    categories = getattr(getattr(values, "dtype", None), "categories", None)
    if categories is not None:
        ranges += _array_ranges(categories.array)
    return ranges


def _arrow_ranges(obj: Any) -> list[tuple[int, int]]:
    import pyarrow as pa

    if isinstance(obj, pa.Table | pa.RecordBatch):
        return [r for col in obj.columns for r in _arrow_ranges(col)]
    chunks = obj.chunks if isinstance(obj, pa.ChunkedArray) else [obj]
    return [(b.address, b.size) for c in chunks for b in c.buffers() if b is not None and b.size]


# --- the entry points --------------------------------------------------------------


def _kind(obj: Any) -> str | None:
    if isinstance(obj, np.ndarray):
        return "ndarray"
    module = type(obj).__module__.split(".")[0]
    if module == "pandas" and "pandas" in sys.modules:
        import pandas as pd

        if isinstance(obj, pd.DataFrame | pd.Series):
            return "pandas"
    if module == "pyarrow" and "pyarrow" in sys.modules:
        import pyarrow as pa

        if isinstance(obj, pa.Table | pa.RecordBatch | pa.Array | pa.ChunkedArray):
            return "arrow"
    return None


_ENCODERS: dict[str, Callable[[Any], Encoded]] = {
    "ndarray": _encode_ndarray,
    "pandas": _encode_pandas,
    "arrow": _encode_arrow,
}
_DECODERS: dict[str, Callable[[dict[str, Any], memoryview], Any]] = {
    "ndarray": _decode_ndarray,
    "pandas": _decode_pandas,
    "arrow": _decode_arrow,
    "arrow-file": _decode_arrow_file,
}


def describe(obj: Any) -> str:
    """What ``obj`` is, for messages."""
    shape = getattr(obj, "shape", None)
    return f"{type(obj).__module__}.{type(obj).__qualname__}" + (f" {shape}" if shape is not None else "")


def encode(obj: Any) -> Encoded:
    """``obj`` as a header and buffers (local; refuses what cannot be shared).

    Raises
    ------
    NotShareable
        For a type hpcshare cannot share, or a column of Python objects.
    """
    kind = _kind(obj)
    if kind is None:
        raise NotShareable(
            f"cannot share {describe(obj)}: hpcshare.put takes a NumPy array, a pandas "
            "DataFrame or Series, or a pyarrow Table, RecordBatch or Array "
            "(pandas and pyarrow: pip install 'hpcshare[dataframe]'). Python objects "
            "cannot live in shared memory."
        )
    return _ENCODERS[kind](obj)


def read_header(buf: memoryview) -> dict[str, Any]:
    """The header at the start of a file written by :meth:`Encoded.write_into`."""
    magic, length = _PREFIX.unpack_from(buf, 0)
    if magic != _MAGIC:
        raise ValueError("not an hpcshare object file (bad magic)")
    header: dict[str, Any] = pickle.loads(buf[_PREFIX.size : _PREFIX.size + length])
    return header


def decode(buf: memoryview) -> Any:
    """The object written into ``buf``, built over it without copying its data buffers."""
    header = read_header(buf)
    return _DECODERS[header["kind"]](header, buf)
