"""Read PyTorch-serialized files into NumPy arrays without importing torch.

The official SPADE/CLADE checkpoints and the FID Inception weights are PyTorch files. Installing
torch only to read them is heavy, and `torch.load` unpickles arbitrary code, so this module parses
the formats itself with a restricted unpickler that can build only dicts, lists, tensors and the
few torch classes that describe them; any other global in the pickle is an error.

Supported:

* `load_torch_file`: `torch.save(state_dict)` files in the zip format (torch >= 1.6) and the legacy
  format (torch < 1.6: a stream of pickles followed by raw storages). Returns a flat
  `{name: np.ndarray}`.
* `load_torchscript_params`: the parameters and tensor attributes of a `torch.jit.save` archive,
  named the way the scripted module's `state_dict()` would name them.

Layouts (read from the formats, summarised here because torch documents them only in code):

* zip: `<root>/data.pkl` pickles the object; a tensor is
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])`
  and its storage is a persistent id `('storage', StorageType, key, location, numel)` whose bytes
  are the zip member `<root>/data/<key>` (little-endian unless `<root>/byteorder` says `big`).
* legacy: pickles of (magic number, protocol version 1001, sys_info), then the object whose
  storages are persistent ids `('storage', StorageType, root_key, location, numel, view)` with
  `view = None | (view_key, offset, view_numel)`, then a pickled list of root keys; then, per key
  in that order, an int64 element count followed by the raw element bytes.
* TorchScript: the same zip layout; `data.pkl` pickles the module tree as `__torch__.*` objects
  whose state is a dict of attributes (submodules, tensors, plain values).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

try:  # bfloat16 has no NumPy dtype; ml_dtypes ships with jax.
    import ml_dtypes

    _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - jax always brings ml_dtypes
    _BFLOAT16 = None

__all__ = ["TorchFileError", "load_torch_file", "load_torchscript_params"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# One row per element type: torch's dtype attribute names (dtypes may appear as pickled globals),
# the legacy storage class, the NumPy dtype (little-endian; byte order is fixed up when reading).
_ELEMENT_TYPES: tuple[tuple[tuple[str, ...], str, np.dtype], ...] = (
    (("float64", "double"), "DoubleStorage", np.dtype("<f8")),
    (("float32", "float"), "FloatStorage", np.dtype("<f4")),
    (("float16", "half"), "HalfStorage", np.dtype("<f2")),
    (("int64", "long"), "LongStorage", np.dtype("<i8")),
    (("int32", "int"), "IntStorage", np.dtype("<i4")),
    (("int16", "short"), "ShortStorage", np.dtype("<i2")),
    (("int8",), "CharStorage", np.dtype("i1")),
    (("uint8",), "ByteStorage", np.dtype("u1")),
    (("bool",), "BoolStorage", np.dtype("?")),
) + (((("bfloat16",), "BFloat16Storage", _BFLOAT16),) if _BFLOAT16 is not None else ())

# Storage class name -> element dtype; torch dtype attribute name -> NumPy dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {storage: dt for _, storage, dt in _ELEMENT_TYPES}
_STORAGE_DTYPES["UntypedStorage"] = np.dtype("u1")
_TORCH_DTYPES: dict[str, np.dtype] = {n: dt for names, _, dt in _ELEMENT_TYPES for n in names}


class TorchFileError(ValueError):
    """A PyTorch file that this reader cannot (or will not) read; the message names the file."""


class _StorageType:
    """Stand-in for a `torch.*Storage` class: only its element dtype matters."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = dtype


class _Storage:
    """A flat storage: a 1-D NumPy array of its elements (read-only view of the file bytes)."""

    def __init__(self, data: np.ndarray):
        self.data = data


class _Tensor:
    """Marker wrapping a rebuilt tensor so parameters and plain arrays can be told apart."""

    def __init__(self, array: np.ndarray):
        self.array = array


class _ScriptObject:
    """A TorchScript `__torch__.*` object (module or class): its qualified name and attributes."""

    qualname = "?"

    def __init__(self, *args):
        self.attrs: dict[str, Any] = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(
                f"TorchScript object {self.qualname} has non-dict state {type(state).__name__}"
            )
        self.attrs = state


def _rebuild_tensor(storage, offset, size, stride, *unused) -> _Tensor:
    """`torch._utils._rebuild_tensor(_v2)`: a strided view of a storage, copied (owns memory)."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage is {type(storage).__name__}, not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    flat = storage.data
    if any(s == 0 for s in size):
        return _Tensor(np.zeros(size, flat.dtype))
    if offset < 0 or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"negative offset/stride ({offset}, {stride})")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
        raise pickle.UnpicklingError(
            f"tensor (offset {offset}, size {size}, stride {stride}) runs past its storage of "
            f"{flat.size} elements"
        )
    base = flat[offset:]
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )
    return _Tensor(np.array(view, order="C", copy=True))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused) -> _Tensor:
    """`torch._utils._rebuild_parameter(_with_state)`: a Parameter is just its tensor here."""
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError(f"parameter data is {type(data).__name__}, not a tensor")
    return data


def _build_list(values):
    """`torch.jit._pickle.build_*list`: TorchScript's typed lists are plain lists here."""
    return list(values)


def _restore_type_tag(value, type_str):
    """`torch.jit._pickle.restore_type_tag`: the type tag only matters to TorchScript."""
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a tensor file needs; see `find_class`."""

    def __init__(self, file, *, source: str, load_storage, torchscript: bool = False):
        super().__init__(file)
        self._source = source
        self._load_storage = load_storage
        self._torchscript = torchscript
        self._script_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils":
            if name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return _rebuild_tensor
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
        if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if (module, name) == ("torch", "Size"):
            return tuple
        if self._torchscript:
            if module == "torch.jit._pickle":
                if name.startswith("build_") and name.endswith("list"):
                    return _build_list
                if name == "restore_type_tag":
                    return _restore_type_tag
            if module == "__torch__" or module.startswith("__torch__."):
                qualname = f"{module}.{name}"
                if qualname not in self._script_classes:
                    self._script_classes[qualname] = type(
                        name, (_ScriptObject,), {"qualname": qualname}
                    )
                return self._script_classes[qualname]
        raise pickle.UnpicklingError(
            f"{self._source}: refusing to load global '{module}.{name}' (not a tensor, storage or "
            "container; this reader never runs code from a pickle)"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
        return self._load_storage(pid)


def _unpickle(data: bytes | io.BufferedIOBase, **kwargs) -> Any:
    f = io.BytesIO(data) if isinstance(data, bytes) else data
    return _RestrictedUnpickler(f, **kwargs).load()


def _storage_dtype(storage_type, source: str) -> np.dtype:
    if not isinstance(storage_type, _StorageType):
        raise TorchFileError(f"{source}: storage type {storage_type!r} is not a torch storage")
    return storage_type.dtype


def _read_zip_object(path: Path, *, torchscript: bool) -> Any:
    """Unpickle `<root>/data.pkl` of a zip-format file, resolving storages from `<root>/data/`."""
    source = str(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise TorchFileError(f"{source}: zip archive without a single '<root>/data.pkl'")
        root = pkl[0][: -len("data.pkl")]
        big_endian = False
        if f"{root}byteorder" in names:
            order = zf.read(f"{root}byteorder").decode().strip()
            if order not in ("little", "big"):
                raise TorchFileError(f"{source}: unknown byteorder {order!r}")
            big_endian = order == "big"
        storages: dict[str, _Storage] = {}

        def load_storage(pid) -> _Storage:
            if len(pid) != 5:
                raise pickle.UnpicklingError(f"{source}: unexpected storage id {pid!r}")
            _, storage_type, key, _location, numel = pid
            dtype = _storage_dtype(storage_type, source)
            if key not in storages:
                member = f"{root}data/{key}"
                try:
                    raw = zf.read(member)
                except KeyError:
                    raise TorchFileError(f"{source}: storage '{member}' is missing") from None
                dt = dtype.newbyteorder(">") if big_endian else dtype
                count = len(raw) // dtype.itemsize
                if count < numel:
                    raise TorchFileError(
                        f"{source}: storage {key} holds {count} elements, expected {numel}"
                    )
                storages[key] = _Storage(np.frombuffer(raw, dt, count).astype(dtype, copy=False))
            return storages[key]

        return _unpickle(
            zf.read(pkl[0]), source=source, load_storage=load_storage, torchscript=torchscript
        )


def _read_legacy_object(path: Path) -> Any:
    """Read a pre-1.6 (non-zip) `torch.save` file: pickles, then the raw storages."""
    source = str(path)
    with open(path, "rb") as f:
        # The header pickles hold only ints and a dict of ints: nothing needs resolving.
        def header():
            return _unpickle(f, source=source, load_storage=_no_storage)

        try:
            magic = header()
        except Exception as e:
            raise TorchFileError(
                f"{source}: not a PyTorch file (neither zip nor legacy pickle format): {e}"
            ) from None
        if magic != _LEGACY_MAGIC:
            raise TorchFileError(
                f"{source}: unsupported file (no legacy torch magic number; the pre-0.4 tar "
                "format and plain pickles are not supported)"
            )
        protocol = header()
        if protocol != _LEGACY_PROTOCOL:
            raise TorchFileError(f"{source}: unsupported legacy protocol version {protocol}")
        sys_info = header()
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

        # (root_key -> (dtype, numel)) collected while unpickling; bytes filled in afterwards.
        roots: dict[str, tuple[np.dtype, int]] = {}
        pending: list[tuple[_Storage, str, int, int]] = []  # (storage, root_key, offset, numel)

        def load_storage(pid) -> _Storage:
            if len(pid) != 6:
                raise pickle.UnpicklingError(f"{source}: unexpected legacy storage id {pid!r}")
            _, storage_type, root_key, _location, numel, view = pid
            dtype = _storage_dtype(storage_type, source)
            if root_key in roots and roots[root_key][0] != dtype:
                raise TorchFileError(f"{source}: storage {root_key} used with two dtypes")
            roots[root_key] = (dtype, int(numel))
            offset, view_numel = 0, int(numel)
            if view is not None:
                _view_key, offset, view_numel = view
            storage = _Storage(np.zeros(0, dtype))  # placeholder, filled below
            pending.append((storage, root_key, int(offset), int(view_numel)))
            return storage

        # Tensors need their storage bytes, which follow the object pickle; so rebuild lazily:
        # unpickle with placeholder storages that record (storage, tensor args), then resolve.
        obj = _LegacyObjectReader(f, source=source, load_storage=load_storage).load()
        keys = header()
        if not isinstance(keys, list):
            raise TorchFileError(f"{source}: malformed storage key list")
        data: dict[str, np.ndarray] = {}
        for key in keys:
            if key not in roots:
                raise TorchFileError(f"{source}: storage {key} listed but never referenced")
            dtype, numel = roots[key]
            (count,) = struct.unpack("<q" if little else ">q", f.read(8))
            raw = f.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise TorchFileError(f"{source}: file ends inside storage {key}")
            dt = dtype if little else dtype.newbyteorder(">")
            data[key] = np.frombuffer(raw, dt).astype(dtype, copy=False)
        for storage, root_key, offset, numel in pending:
            if root_key not in data:
                raise TorchFileError(f"{source}: storage {root_key} has no data")
            storage.data = data[root_key][offset : offset + numel]
    return _resolve_deferred(obj)


def _no_storage(pid):
    raise pickle.UnpicklingError(f"unexpected storage {pid!r} in a header pickle")


class _Deferred:
    """A tensor of a legacy file whose storage bytes are not read yet."""

    def __init__(self, fn, args):
        self.fn = fn
        self.args = args


class _LegacyObjectReader(_RestrictedUnpickler):
    """Restricted unpickler that defers tensor rebuilding until the storages are read."""

    def find_class(self, module: str, name: str):
        target = super().find_class(module, name)
        if target in (_rebuild_tensor, _rebuild_parameter):
            return lambda *args: _Deferred(target, args)
        return target


def _resolve_deferred(obj: Any) -> Any:
    if isinstance(obj, _Deferred):
        return obj.fn(*(_resolve_deferred(a) for a in obj.args))
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _resolve_deferred(obj[k])
        return obj
    if isinstance(obj, list):
        return [_resolve_deferred(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve_deferred(v) for v in obj)
    return obj


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Flatten nested dicts/lists of tensors into `out`; non-tensor leaves are dropped."""
    if isinstance(obj, _Tensor):
        out[prefix] = obj.array
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}" if prefix else str(i), out)


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `torch.save`d state dict (zip or legacy format) without torch.

    Args:
      path: the `.pth`/`.pt` file.

    Returns:
      `{name: array}` in file order. Nested dicts are flattened with '.' (as `state_dict()` names
      them); a top-level dict with a 'state_dict' entry is replaced by that entry. Non-tensor
      values (step counters, option strings) are left out. Arrays keep the tensor's dtype
      (bfloat16 as `ml_dtypes.bfloat16`) and are C-contiguous copies.

    Raises:
      TorchFileError: the file is not a PyTorch file, or holds something other than tensors and
        containers (e.g. a pickled nn.Module), naming the file.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            obj = _read_zip_object(path, torchscript=False)
        else:
            obj = _read_legacy_object(path)
    except pickle.UnpicklingError as e:
        raise TorchFileError(f"{path}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if isinstance(obj, _Tensor):
        return {"": obj.array}
    if not isinstance(obj, dict):
        raise TorchFileError(f"{path}: top-level object is {type(obj).__name__}, not a dict")
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out


def load_torchscript_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the tensors of a `torch.jit.save` archive without torch.

    Args:
      path: the TorchScript `.pt` file.

    Returns:
      `{name: array}`, names as the scripted module's `state_dict()` gives them
      (`net.layers.conv.weight`): submodule attribute names joined by '.', in the module's
      attribute order. Every tensor attribute is included (parameters, buffers, and any other
      tensor attribute a scripted class holds); code, constants and non-tensor attributes are not.

    Raises:
      TorchFileError: not a TorchScript zip archive, naming the file.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise TorchFileError(f"{path}: not a TorchScript archive (not a zip file)")
    with zipfile.ZipFile(path) as zf:
        if not any(n.endswith("/constants.pkl") for n in zf.namelist()):
            raise TorchFileError(f"{path}: zip file without constants.pkl: not TorchScript")
    try:
        obj = _read_zip_object(path, torchscript=True)
    except pickle.UnpicklingError as e:
        raise TorchFileError(f"{path}: {e}") from None
    if not isinstance(obj, _ScriptObject):
        raise TorchFileError(f"{path}: data.pkl holds {type(obj).__name__}, not a script module")
    out: dict[str, np.ndarray] = {}

    def walk(node: _ScriptObject, prefix: str) -> None:
        for name, value in getattr(node, "attrs", {}).items():
            full = f"{prefix}{name}"
            if isinstance(value, _Tensor):
                out[full] = value.array
            elif isinstance(value, _ScriptObject):
                walk(value, f"{full}.")

    walk(obj, "")
    return out
