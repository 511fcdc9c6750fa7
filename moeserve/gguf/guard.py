"""A bounds-checked pass over a GGUF file's header, metadata and tensor table, before gguf-py reads it.

Why: gguf-py trusts the counts it reads. A metadata array that claims 2^64 - 1 items makes it loop
past the end of the file, growing without bound (a 4.5 MB file reached 3 GB in two minutes), and
tensor offsets that are misaligned, wrap or point past the end are accepted. This pass reads only
lengths and counts, checks each against the bytes left in the file before using it, and checks every
tensor's dimensions, type, alignment and extent — so a hostile file of N bytes costs O(N) time and
memory, and every failure is one `GGUFError` naming the file and the key or tensor.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count;
metadata = (string key, u32 type, value)*; tensor infos = (string name, u32 n_dims, u64 dims[n_dims],
u32 type, u64 offset)*; the data section starts at the next multiple of `general.alignment` (32).
A string is a u64 length and that many bytes.
"""

from __future__ import annotations

import mmap
import os
import struct

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from moeserve.errors import GGUFError, UnsupportedQuantError

# value type -> fixed size in bytes (8: string, 9: array are variable)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 1 << 50
_MAX_ARRAY_DEPTH = 2


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: str) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, the file has {self.size - self.pos} left "
                            "(truncated or corrupt)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> object:
        """Skip one metadata value; returns it when it is a scalar (for general.alignment)."""
        if vtype in _FIXED:
            n = _FIXED[vtype]
            self.need(n, what)
            fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[n]
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
            self.pos += n
            return v
        if vtype == _STRING:
            n = self.u64(f"the length of {what}")
            self.need(n, what)
            self.pos += n
            return None
        if vtype == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise self.fail(f"{what}: arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            itype = self.u32(f"the item type of {what}")
            count = self.u64(f"the item count of {what}")
            if itype in _FIXED:
                self.need(count * _FIXED[itype], f"{what} ({count} items)")
                self.pos += count * _FIXED[itype]
                return None
            if itype not in (_STRING, _ARRAY):
                raise self.fail(f"{what}: unknown array item type {itype}")
            min_item = 8 if itype == _STRING else 12  # a length, or an item type + a count
            if count * min_item > self.size - self.pos:
                raise self.fail(f"{what} claims {count} items, more than the {self.size - self.pos} bytes left "
                                "could hold (truncated or corrupt)")
            for i in range(count):
                self.skip_value(itype, f"{what}[{i}]", depth + 1)
            return None
        raise self.fail(f"{what}: unknown metadata value type {vtype}")


def check_structure(path: str | os.PathLike[str]) -> None:
    """Raise `GGUFError` (or `UnsupportedQuantError`) if the file's structure is inconsistent with its size."""
    path = str(path)
    size = os.path.getsize(path)
    if size < 24:
        raise GGUFError(f"{path}: {size} bytes is too short for a GGUF header (truncated or not GGUF)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf, path)
        magic = bytes(buf[:4])
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        c.pos = 4
        version = c.u32("the version")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = c.u64("the tensor count")
        n_kv = c.u64("the metadata count")
        if n_kv * 13 > size - c.pos:  # key length 8 + type 4 + at least 1 byte of value
            raise GGUFError(f"{path}: header claims {n_kv} metadata entries, more than the file could hold")
        if n_tensors * 24 > size - c.pos:  # name length 8 + n_dims 4 + type 4 + offset 8
            raise GGUFError(f"{path}: header claims {n_tensors} tensors, more than the file could hold")
        alignment = 32
        for i in range(n_kv):
            key_bytes = c.string(f"metadata key #{i}")
            key = key_bytes.decode("utf-8", "replace")
            vtype = c.u32(f"the type of metadata key '{key}'")
            value = c.skip_value(vtype, f"metadata key '{key}'")
            if key == "general.alignment":
                if vtype != 4 or not isinstance(value, int) or value == 0 or value & (value - 1):
                    raise GGUFError(f"{path}: metadata key 'general.alignment' must be a power-of-two uint32, "
                                    f"found type {vtype} value {value!r}")
                alignment = value
        infos = []
        for i in range(n_tensors):
            name = c.string(f"the name of tensor #{i}").decode("utf-8", "replace")
            n_dims = c.u32(f"the dimension count of tensor '{name}'")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise GGUFError(f"{path}: tensor '{name}' has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
            dims = [c.u64(f"dimension {d} of tensor '{name}'") for d in range(n_dims)]
            qtype = c.u32(f"the type of tensor '{name}'")
            offset = c.u64(f"the offset of tensor '{name}'")
            infos.append((name, dims, qtype, offset))
        data_start = -(-c.pos // alignment) * alignment
        seen: set[str] = set()
        for name, dims, qtype, offset in infos:
            if name in seen:
                raise GGUFError(f"{path}: tensor '{name}' appears twice in the tensor table")
            seen.add(name)
            n = 1
            for d in dims:
                if d == 0:
                    raise GGUFError(f"{path}: tensor '{name}' has a zero dimension {dims}")
                n *= d
            if n > _MAX_ELEMENTS:
                raise GGUFError(f"{path}: tensor '{name}' claims {n} elements (dimensions {dims})")
            try:
                qt = GGMLQuantizationType(qtype)
            except ValueError:
                raise UnsupportedQuantError(f"{path}: tensor '{name}' uses an unknown quantization type {qtype}") \
                    from None
            block, type_size = GGML_QUANT_SIZES[qt]
            if dims[0] % block:
                raise GGUFError(f"{path}: tensor '{name}' ({qt.name}) has a row of {dims[0]} elements, not a "
                                f"multiple of its block size {block}")
            nbytes = n // block * type_size
            if offset % alignment:
                raise GGUFError(f"{path}: tensor '{name}' starts at data offset {offset}, not a multiple of the "
                                f"alignment {alignment}")
            end = data_start + offset + nbytes
            if end > size:
                raise GGUFError(f"{path}: file is truncated: tensor '{name}' needs bytes up to {end}, file has {size}")
