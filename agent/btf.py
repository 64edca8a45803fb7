"""Offsets of kernel struct members, read from the node's own BTF (/sys/kernel/btf/vmlinux).

A small reader of the documented BTF format (Documentation/bpf/btf.rst): a header, a type
section of variable-length records, a string section. Why not libbpf through ctypes or
bpftool: the image carries neither, and the reader needs only three things (find a struct
by name, walk its members, follow typedefs), about a hundred lines with no dependency.
Never the generic headers' offsets: those belong to another kernel.

    btf = Btf.load()                                   # BtfError when absent or unreadable
    btf.member("tcp_sock", "srtt_us")                  # Member(bit_offset=..., bit_size=32)
    btf.enum("skb_drop_reason")                        # {2: "SKB_DROP_REASON_NOT_SPECIFIED", ...}
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

VMLINUX = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F

# kind -> bytes that follow the 12-byte struct btf_type (vlen = entries for list kinds)
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 13, 14, 15, 17, 18, 19
_FIXED_EXTRA = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_PER_ENTRY = {KIND_STRUCT: 12, KIND_UNION: 12, KIND_ENUM: 8, KIND_FUNC_PROTO: 8, KIND_DATASEC: 12, KIND_ENUM64: 12}
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


class BtfError(Exception):
    """BTF missing, unreadable, or without the asked-for member; str() says which."""


@dataclass(frozen=True)
class Member:
    """Where a member lives inside its outermost struct, in bits (bit_size from its type)."""

    bit_offset: int
    bit_size: int
    kind: int = 0          # the member's type's BTF kind, typedefs and qualifiers followed (KIND_*)

    @property
    def byte_offset(self) -> int:
        return self.bit_offset // 8


class Btf:
    """Parsed type section of one BTF blob (type ids start at 1)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BtfError(f"not little-endian BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types_start = hdr_len + type_off
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self._offsets = [0]          # byte offset of each type record; index = type id
        self._by_name: dict[str, list[int]] = {}
        pos, end = self._types_start, self._types_start + type_len
        while pos < end:
            name_off, info, _size = struct.unpack_from("<III", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            type_id = len(self._offsets)
            self._offsets.append(pos)
            if kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64) and name_off:
                self._by_name.setdefault(self._name(name_off), []).append(type_id)
            pos += 12 + _FIXED_EXTRA.get(kind, 0) + _PER_ENTRY.get(kind, 0) * vlen

    @classmethod
    def load(cls, path: str = VMLINUX) -> "Btf":
        try:
            return cls(Path(path).read_bytes())
        except OSError as e:
            raise BtfError(f"{path}: {e.strerror or e}") from None

    def _name(self, offset: int) -> str:
        return self._strings[offset: self._strings.index(b"\0", offset)].decode()

    def _record(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(kind, vlen, kind_flag, size_or_type, position after the 12-byte header)."""
        pos = self._offsets[type_id]
        _name_off, info, size_or_type = struct.unpack_from("<III", self._data, pos)
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size_or_type, pos + 12

    def _resolve(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(64):
            kind, _vlen, _flag, target, _pos = self._record(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = target
        raise BtfError(f"type {type_id}: qualifier chain too long")

    def _bits(self, type_id: int) -> int:
        kind, _vlen, _flag, size, pos = self._record(self._resolve(type_id))
        if kind == KIND_INT:
            return struct.unpack_from("<I", self._data, pos)[0] & 0xFF
        if kind == KIND_PTR:
            return 64
        return size * 8

    def _find(self, type_id: int, name: str, base: int) -> Optional[Member]:
        """`name` among a struct's members, looking into anonymous struct/union members."""
        kind, vlen, kind_flag, _size, pos = self._record(self._resolve(type_id))
        if kind not in (KIND_STRUCT, KIND_UNION):
            return None
        for i in range(vlen):
            name_off, member_type, offset = struct.unpack_from("<III", self._data, pos + 12 * i)
            bit_offset, bit_size = (offset & 0xFFFFFF, offset >> 24) if kind_flag else (offset, 0)
            if name_off and self._name(name_off) == name:
                return Member(base + bit_offset, bit_size or self._bits(member_type),
                              self._record(self._resolve(member_type))[0])
            if not name_off:
                found = self._find(member_type, name, base + bit_offset)
                if found:
                    return found
        return None

    def member(self, struct_name: str, name: str) -> Member:
        """Offset of `name` in `struct struct_name` (BtfError naming both when absent)."""
        for type_id in self._by_name.get(struct_name, []):
            kind = self._record(type_id)[0]
            if kind == KIND_STRUCT:
                found = self._find(type_id, name, 0)
                if found:
                    return found
        raise BtfError(f"struct {struct_name} has no member {name} in this kernel's BTF")

    def enum(self, enum_name: str) -> dict[int, str]:
        """The values and names of `enum enum_name` (BtfError when this kernel has none)."""
        for type_id in self._by_name.get(enum_name, []):
            kind, vlen, kind_flag, _size, pos = self._record(type_id)
            if kind == KIND_ENUM:     # entries: name_off, a 32-bit value (signed when kind_flag)
                fmt, step = ("<Ii" if kind_flag else "<II"), 8
            elif kind == KIND_ENUM64:  # entries: name_off, low 32 bits, high 32 bits
                fmt, step = "<III", 12
            else:
                continue
            values = {}
            for i in range(vlen):
                name_off, *parts = struct.unpack_from(fmt, self._data, pos + step * i)
                value = parts[0] if len(parts) == 1 else parts[0] | parts[1] << 32
                values[value] = self._name(name_off)
            return values
        raise BtfError(f"enum {enum_name} is not in this kernel's BTF")
