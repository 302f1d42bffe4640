"""tools/train/gguf_io.py - a small GGUF (version 3) reader and writer in numpy.

The export writes the trained model as llama.cpp GGUF files; the gguf Python
package is not available here, so this module does the little that is
needed: metadata of the scalar, string and array types, and tensors of type
F32 and F16 (the reader also lists the type of any other tensor, so golden
files with quantized tensors can be compared by name and type).

Layout (GGUF v3, little endian): magic "GGUF", u32 version, u64 n_tensors,
u64 n_kv, the key/value pairs, the tensor infos (name, n_dims, ne[] with
ne[0] the contiguous row length, u32 type, u64 offset into the data
section), padding to the alignment (general.alignment, default 32), then the
data, each tensor starting at an aligned offset.
"""
import struct

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

# Metadata value types.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, \
    T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(13)

_SCALAR_FMT = {
    T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h",
    T_UINT32: "<I", T_INT32: "<i", T_FLOAT32: "<f", T_BOOL: "<?",
    T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d",
}

# GGML tensor types: name, block size (elements), bytes per block.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    30: ("BF16", 1, 2),
}
GGML_F32, GGML_F16 = 0, 1


class Value:
    """A metadata value with an explicit GGUF type (for arrays: the element type)."""

    def __init__(self, vtype, value, elem_type=None):
        self.vtype = vtype
        self.value = value
        self.elem_type = elem_type


def u32(v):
    return Value(T_UINT32, int(v))


def i32(v):
    return Value(T_INT32, int(v))


def f32(v):
    return Value(T_FLOAT32, float(v))


def boolean(v):
    return Value(T_BOOL, bool(v))


def string(v):
    return Value(T_STRING, str(v))


def arr(elem_type, values):
    return Value(T_ARRAY, list(values), elem_type)


# ==== Writer ===============================================================

def _w_str(out, s):
    b = s.encode("utf-8")
    out.append(struct.pack("<Q", len(b)))
    out.append(b)


def _w_scalar(out, vtype, v):
    if vtype == T_STRING:
        _w_str(out, v)
    else:
        out.append(struct.pack(_SCALAR_FMT[vtype], v))


def write_gguf(path, kv, tensors):
    """Writes a GGUF file. kv: list of (key, Value) in file order. tensors:
    list of (name, numpy array, ggml type) where the array has numpy shape
    [..., ne1, ne0] (row-major, last axis contiguous) and type is GGML_F32 or
    GGML_F16 (the array is converted)."""
    out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv))]
    for key, val in kv:
        _w_str(out, key)
        out.append(struct.pack("<I", val.vtype))
        if val.vtype == T_ARRAY:
            out.append(struct.pack("<IQ", val.elem_type, len(val.value)))
            if val.elem_type == T_STRING:
                for s in val.value:
                    _w_str(out, s)
            else:
                fmt = _SCALAR_FMT[val.elem_type]
                out.append(np.asarray(val.value, dtype=np.dtype(fmt)).tobytes())
        else:
            _w_scalar(out, val.vtype, val.value)
    blobs = []
    offset = 0
    for name, a, ttype in tensors:
        if ttype == GGML_F32:
            data = np.ascontiguousarray(a, dtype="<f4")
        elif ttype == GGML_F16:
            data = np.ascontiguousarray(a, dtype="<f2")
        else:
            raise ValueError("%s: only F32 and F16 can be written" % name)
        ne = list(reversed(data.shape))
        _w_str(out, name)
        out.append(struct.pack("<I", len(ne)))
        out.append(struct.pack("<%dQ" % len(ne), *ne))
        out.append(struct.pack("<IQ", ttype, offset))
        b = data.tobytes()
        pad = (-len(b)) % ALIGNMENT
        blobs.append(b + b"\0" * pad)
        offset += len(b) + pad
    head = b"".join(out)
    head += b"\0" * ((-len(head)) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(head)
        for b in blobs:
            f.write(b)


# ==== Reader ===============================================================

class GGUFFile:
    """A parsed GGUF file. kv: dict key -> python value (arrays as lists);
    kv_types: key -> (type, elem_type); tensors: dict name -> dict(type=name,
    ne=[...], offset=int); tensor_order: names in file order. tensor(name)
    returns an F32/F16 tensor as a float32 numpy array of numpy shape
    reversed(ne)."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.buf = f.read()
        self.pos = 0
        if self._take(4) != GGUF_MAGIC:
            raise ValueError("%s: not a GGUF file" % path)
        version, n_tensors, n_kv = struct.unpack("<IQQ", self._take(20))
        if version not in (2, 3):
            raise ValueError("%s: GGUF version %d" % (path, version))
        self.kv, self.kv_types, self.kv_order = {}, {}, []
        for _ in range(n_kv):
            key = self._str()
            vtype = self._u32()
            if vtype == T_ARRAY:
                et = self._u32()
                n = struct.unpack("<Q", self._take(8))[0]
                if et == T_STRING:
                    v = [self._str() for _ in range(n)]
                else:
                    dt = np.dtype(_SCALAR_FMT[et])
                    v = np.frombuffer(self._take(n * dt.itemsize), dtype=dt).tolist()
                self.kv_types[key] = (vtype, et)
            else:
                v = self._scalar(vtype)
                self.kv_types[key] = (vtype, None)
            self.kv[key] = v
            self.kv_order.append(key)
        self.tensors, self.tensor_order = {}, []
        for _ in range(n_tensors):
            name = self._str()
            nd = self._u32()
            ne = list(struct.unpack("<%dQ" % nd, self._take(8 * nd)))
            ttype = self._u32()
            off = struct.unpack("<Q", self._take(8))[0]
            self.tensors[name] = dict(type=GGML_TYPES.get(ttype, ("?%d" % ttype,))[0],
                                      ttype=ttype, ne=ne, offset=off)
            self.tensor_order.append(name)
        align = self.kv.get("general.alignment", ALIGNMENT)
        self.data_start = self.pos + ((-self.pos) % align)

    def _take(self, n):
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def _u32(self):
        return struct.unpack("<I", self._take(4))[0]

    def _str(self):
        n = struct.unpack("<Q", self._take(8))[0]
        return self._take(n).decode("utf-8")

    def _scalar(self, vtype):
        if vtype == T_STRING:
            return self._str()
        fmt = _SCALAR_FMT[vtype]
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def tensor(self, name):
        t = self.tensors[name]
        n = int(np.prod(t["ne"]))
        start = self.data_start + t["offset"]
        if t["ttype"] == GGML_F32:
            a = np.frombuffer(self.buf, dtype="<f4", count=n, offset=start)
        elif t["ttype"] == GGML_F16:
            a = np.frombuffer(self.buf, dtype="<f2", count=n, offset=start)
        else:
            raise ValueError("%s: type %s cannot be read here" % (name, t["type"]))
        return a.astype(np.float32).reshape(list(reversed(t["ne"])))
