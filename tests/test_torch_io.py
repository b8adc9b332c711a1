"""Tests of clade_jax.convert.torch_io: PyTorch files written by hand (no torch), then read back.

The files are built opcode by opcode with a tiny pickle emitter, in the layouts torch writes:
zip (torch >= 1.6), legacy (torch < 1.6) and TorchScript. They cover several dtypes, a
non-contiguous stride, a storage shared by two tensors at different offsets, parameters, nested
dicts, and a pickle that tries to call an arbitrary function (must be refused, not run).
The last test reads FID Inception weights from a pytorch-fid-style `.pth` written this way.
"""

from __future__ import annotations

import pickle
import struct
import zipfile

import numpy as np
import pytest

from clade_jax import weights
from clade_jax.convert import torch_io

_STORAGE_NAMES = {
    np.dtype("f4"): "FloatStorage",
    np.dtype("f2"): "HalfStorage",
    np.dtype("f8"): "DoubleStorage",
    np.dtype("i8"): "LongStorage",
    np.dtype("i4"): "IntStorage",
    np.dtype("u1"): "ByteStorage",
    np.dtype("?"): "BoolStorage",
}


class Global:
    """A pickled reference to `module.name` (written as a GLOBAL opcode, never imported)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Emitter:
    """Writes pickle protocol-2 opcodes; enough to express torch's tensor pickles."""

    def __init__(self):
        self.b = bytearray(b"\x80\x02")  # PROTO 2

    def glob(self, module: str, name: str):
        self.b += b"c" + f"{module}\n{name}\n".encode()

    def str(self, s: str):
        enc = s.encode()
        self.b += b"X" + struct.pack("<I", len(enc)) + enc

    def int(self, i: int):
        self.b += b"J" + struct.pack("<i", i)

    def ints(self, values):
        self.mark()
        for v in values:
            self.int(v)
        self.b += b"t"  # TUPLE

    def mark(self):
        self.b += b"("

    def value(self, v):
        """str, int, None, Global or (nested) tuple of those."""
        if isinstance(v, Global):
            self.glob(v.module, v.name)
        elif isinstance(v, str):
            self.str(v)
        elif v is None:
            self.op(b"N")
        elif isinstance(v, tuple):
            self.mark()
            for item in v:
                self.value(item)
            self.op(b"t")
        else:
            self.int(v)

    def op(self, code: bytes):
        self.b += code

    def ordered_dict(self):
        self.glob("collections", "OrderedDict")
        self.b += b")R"  # EMPTY_TUPLE, REDUCE -> OrderedDict()

    def done(self) -> bytes:
        return bytes(self.b + b".")


def emit_tensor(e: Emitter, pid: tuple, offset: int, size, stride, parameter=False):
    """_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()), maybe wrapped."""
    if parameter:
        e.glob("torch._utils", "_rebuild_parameter")
        e.mark()
    e.glob("torch._utils", "_rebuild_tensor_v2")
    e.mark()
    e.value(pid)
    e.op(b"Q")  # BINPERSID
    e.int(offset)
    e.ints(size)
    e.ints(stride)
    e.op(b"\x89")  # requires_grad False
    e.ordered_dict()  # backward hooks
    e.op(b"tR")
    if parameter:
        e.op(b"\x88")  # requires_grad True
        e.ordered_dict()
        e.op(b"tR")


# A state dict described once, written in each format. Storages: key -> flat array.
STORAGES = {
    "0": np.arange(10, dtype=np.float32) * 0.5,  # shared by 'w' (offset 0) and 'shared' (6)
    "1": np.array([1.5, -2.25, 65504.0, 1e-3], np.float16),
    "2": np.array([np.pi], np.float64),
    "3": np.array([-(2**40), 7, 2**62], np.int64),
    "4": np.array([-5, 0, 2**31 - 1], np.int32),
    "5": np.array([0, 128, 255], np.uint8),
    "6": np.array([True, False, True], bool),
}
# name -> (storage key, offset, size, stride, parameter?)
TENSORS = {
    "w": ("0", 0, (2, 3), (3, 1), True),
    "w_t": ("0", 0, (3, 2), (1, 3), False),  # non-contiguous: transpose of w
    "shared": ("0", 6, (4,), (1,), False),
    "half": ("1", 0, (2, 2), (2, 1), False),
    "scalar": ("2", 0, (), (), False),
    "long": ("3", 0, (3,), (1,), False),
    "int": ("4", 0, (3,), (1,), False),
    "byte": ("5", 0, (3,), (1,), False),
    "mask": ("6", 0, (3,), (1,), False),
}


def expected_arrays():
    out = {}
    for name, (key, offset, size, stride, _) in TENSORS.items():
        flat = STORAGES[key]
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], size, tuple(s * flat.itemsize for s in stride)
        )
        out[f"net.{name}"] = np.array(view)
    return out


def emit_state_dict(e: Emitter, pid_of, offset_of=lambda name, offset: offset) -> None:
    """{'state_dict': {'net': OrderedDict(TENSORS)}, 'epoch': 3}; storages from pid_of(name, key),
    tensor offsets (relative to that storage) from offset_of(name, offset)."""
    e.op(b"}(")  # EMPTY_DICT, MARK
    e.str("epoch")
    e.int(3)
    e.str("state_dict")
    e.op(b"}")
    e.str("net")
    e.ordered_dict()
    e.mark()
    for name, (key, offset, size, stride, parameter) in TENSORS.items():
        e.str(name)
        emit_tensor(e, pid_of(name, key), offset_of(name, offset), size, stride, parameter)
    e.op(b"u")  # SETITEMS into the OrderedDict
    e.op(b"s")  # SETITEM 'net' into the state_dict dict
    e.op(b"u")  # SETITEMS into the top dict


def write_zip(path, root="archive", big_endian=False):
    e = Emitter()

    def pid_of(name, key):
        dtype = STORAGES[key].dtype
        return (
            "storage",
            Global("torch", _STORAGE_NAMES[dtype]),
            key,
            "cpu",
            STORAGES[key].size,
        )

    emit_state_dict(e, pid_of)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{root}/data.pkl", e.done())
        if big_endian:
            zf.writestr(f"{root}/byteorder", "big")
        for key, arr in STORAGES.items():
            data = arr.astype(arr.dtype.newbyteorder(">")) if big_endian else arr
            zf.writestr(f"{root}/data/{key}", data.tobytes())
        zf.writestr(f"{root}/version", "3\n")


def write_legacy(path):
    e = Emitter()

    def pid_of(name, key):
        dtype = STORAGES[key].dtype
        view = None
        if name == "shared":  # exercise view metadata: (view_key, offset, view_numel)
            view = ("view-of-0", 2, 8)
        return (
            "storage",
            Global("torch", _STORAGE_NAMES[dtype]),
            key,
            "cpu",
            STORAGES[key].size,
            view,
        )

    # The view starts at element 2, so 'shared' (element 6 of the root) has offset 4 within it.
    emit_state_dict(e, pid_of, lambda name, offset: offset - 2 if name == "shared" else offset)
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    with open(path, "wb") as f:
        f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps(sys_info, protocol=2))
        f.write(e.done())
        f.write(pickle.dumps(list(STORAGES), protocol=2))
        for arr in STORAGES.values():
            f.write(struct.pack("<q", arr.size))
            f.write(arr.tobytes())


def assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert got[k].flags.c_contiguous and got[k].flags.writeable, k


@pytest.mark.parametrize("big_endian", [False, True])
def test_zip_format(tmp_path, big_endian):
    path = tmp_path / "model.pth"
    write_zip(path, big_endian=big_endian)
    assert_same(torch_io.load_torch_file(path), expected_arrays())


def test_legacy_format(tmp_path):
    path = tmp_path / "latest_net_G.pth"
    write_legacy(path)
    assert_same(torch_io.load_torch_file(path), expected_arrays())


def test_shared_storage_tensors_are_independent_copies(tmp_path):
    path = tmp_path / "m.pth"
    write_zip(path)
    got = torch_io.load_torch_file(path)
    got["net.w"][0, 0] = 100.0
    assert got["net.w_t"][0, 0] == 0.0


def test_refuses_arbitrary_globals(tmp_path):
    # A pickle that would call os.system when loaded with plain pickle.
    e = Emitter()
    e.glob("os", "system")
    e.mark()
    e.str("touch " + str(tmp_path / "pwned"))
    e.op(b"tR")
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", e.done())
    with pytest.raises(torch_io.TorchFileError, match=r"evil\.pth.*os\.system"):
        torch_io.load_torch_file(path)
    assert not (tmp_path / "pwned").exists()


def test_not_a_torch_file_names_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(torch_io.TorchFileError, match="notes.txt"):
        torch_io.load_torch_file(path)


def test_torchscript_params(tmp_path):
    """A scripted module tree: Outer(sub=Inner(weight, bias), scale, sizes=[1, 2], 'training')."""

    def script_object(e, cls, attrs):
        e.glob(f"__torch__.{cls[0]}", cls[1])
        e.op(b")\x81}(")  # EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, MARK
        for name, emit in attrs:
            e.str(name)
            emit()
        e.op(b"ub")  # SETITEMS, BUILD

    def tensor(key, size):
        def emit():
            pid = ("storage", Global("torch", "FloatStorage"), key, "cpu", int(np.prod(size)))
            strides = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
            emit_tensor(e, pid, 0, size, strides)

        return emit

    arrays = {"0": np.arange(6, dtype=np.float32), "1": np.ones(3, np.float32) * 2}
    e = Emitter()

    def inner():
        attrs = [("training", lambda: e.op(b"\x89")), ("weight", tensor("0", (3, 2)))]
        script_object(e, ("mod.___torch_mangle_1", "Inner"), attrs)

    def sizes():
        e.glob("torch.jit._pickle", "build_intlist")
        e.mark()
        e.op(b"](")  # EMPTY_LIST, MARK
        e.int(1)
        e.int(2)
        e.op(b"e")  # APPENDS
        e.op(b"tR")

    script_object(
        e,
        ("mod", "Outer"),
        [
            ("training", lambda: e.op(b"\x89")),
            ("sub", inner),
            ("scale", tensor("1", (3,))),
            ("sizes", sizes),
        ],
    )
    path = tmp_path / "scripted.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("scripted/data.pkl", e.done())
        zf.writestr("scripted/constants.pkl", pickle.dumps((), protocol=2))
        for key, arr in arrays.items():
            zf.writestr(f"scripted/data/{key}", arr.tobytes())
    got = torch_io.load_torchscript_params(path)
    assert list(got) == ["sub.weight", "scale"]
    np.testing.assert_array_equal(got["sub.weight"], arrays["0"].reshape(3, 2))
    np.testing.assert_array_equal(got["scale"], arrays["1"])
    # A plain state-dict file is not TorchScript, and __torch__ classes are refused outside it.
    with pytest.raises(torch_io.TorchFileError, match="scripted.pt"):
        torch_io.load_torch_file(path)


def test_inception_weights_from_pytorch_fid_pth(tmp_path, monkeypatch):
    """A pytorch-fid-style .pth (its names, plus the fc head) loads as the cached npz does."""
    npz = weights.inception_path()
    want = weights.load_inception_state(npz)
    names = list(want) + ["fc.weight", "fc.bias"]
    arrays = dict(want)
    arrays["fc.weight"] = np.zeros((1008, 2048), np.float32)
    arrays["fc.bias"] = np.zeros((1008,), np.float32)
    e = Emitter()
    e.ordered_dict()
    e.mark()
    for i, name in enumerate(names):
        arr = arrays[name]
        e.str(name)
        pid = ("storage", Global("torch", "FloatStorage"), str(i), "cpu", arr.size)
        strides = tuple(int(np.prod(arr.shape[j + 1 :])) for j in range(arr.ndim))
        emit_tensor(e, pid, 0, arr.shape, strides)
    e.op(b"u")
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pt_inception/data.pkl", e.done())
        for i, name in enumerate(names):
            zf.writestr(f"pt_inception/data/{i}", arrays[name].tobytes())
    got = weights.load_inception_state(path)
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # `python -m clade_jax.weights inception --source=<that .pth>` converts it into the cache.
    monkeypatch.setenv("CLADE_JAX_CACHE", str(tmp_path / "cache"))
    weights.main(["inception", f"--source={path}"])
    converted = weights.load_inception_state(weights.inception_path())
    for k in want:
        np.testing.assert_array_equal(converted[k], want[k], err_msg=k)
