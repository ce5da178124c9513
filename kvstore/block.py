"""The stored form of one KV block: a self-checking header followed by the raw tensor bytes.

Layout (little endian):
    magic b"DPKV" (4) | version u16 | json length u32 | json | header crc32 u32 | payload

The json holds key (hex), shape, dtype, num_layers, payload_bytes and the payload checksum;
the header crc covers every byte before it, so a flipped bit anywhere in the header or the
payload is caught. The payload is the tensor's raw bytes (bfloat16 included: no numpy dtype
is involved), so a round trip is bit-exact.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import torch

from kvstore.keys import KEY_BYTES

BLOCK_MAGIC = b"DPKV"
FORMAT_VERSION = 1
CHECKSUM = "crc32"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PREFIX = struct.Struct("<4sHI")  # magic, version, json length
_CRC = struct.Struct("<I")
HEADER_PREFIX_BYTES = _PREFIX.size
MAX_JSON_BYTES = 1 << 16
HEADER_ALIGN = 64  # the json is space-padded so the payload starts 64-byte aligned


class CorruptBlockError(ValueError):
    """A stored block failed a format, checksum or identity check; treat it as a miss."""


@dataclass(frozen=True, slots=True)
class BlockHeader:
    key: bytes
    shape: tuple[int, ...]
    dtype: str
    num_layers: int
    payload_bytes: int
    checksum: int


def block_nbytes(block: torch.Tensor) -> int:
    """Bytes of the block's payload (its elements, without the header)."""
    return block.numel() * block.element_size()


def encode_block(key: bytes, block: torch.Tensor) -> tuple[bytes, memoryview | bytes]:
    """Serialise a block as (header, payload); write both, in that order, to store it.

    Args:
        key: the block's 16-byte key (kvstore.keys).
        block: a Full Block `[layers, 2, block_size, kv_heads, head_dim]` on any device.

    NOTE: the payload is a view of the (CPU, contiguous) tensor's memory, not a copy; it
    stays valid while the caller holds it and the tensor is not modified.
    """
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes")
    dtype = str(block.dtype).removeprefix("torch.")
    if dtype not in DTYPES or block.dim() < 1:
        raise ValueError(f"unsupported block: dtype {dtype}, shape {tuple(block.shape)}")
    flat = block.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    payload: memoryview | bytes = memoryview(flat.numpy()) if flat.numel() else b""
    meta = {
        "key": key.hex(),
        "shape": list(block.shape),
        "dtype": dtype,
        "num_layers": int(block.shape[0]),
        "payload_bytes": len(payload),
        "checksum_alg": CHECKSUM,
        "checksum": zlib.crc32(payload),
    }
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-(HEADER_PREFIX_BYTES + len(body) + _CRC.size) % HEADER_ALIGN)
    head = _PREFIX.pack(BLOCK_MAGIC, FORMAT_VERSION, len(body)) + body
    return head + _CRC.pack(zlib.crc32(head)), payload


def header_size(prefix: bytes | memoryview) -> int:
    """Total header length from its first HEADER_PREFIX_BYTES bytes (to read only the header).

    Args:
        prefix: at least the first HEADER_PREFIX_BYTES bytes of a stored block.
    """
    if len(prefix) < HEADER_PREFIX_BYTES:
        raise CorruptBlockError(f"truncated header: {len(prefix)} bytes")
    magic, version, json_len = _PREFIX.unpack_from(prefix)
    if magic != BLOCK_MAGIC:
        raise CorruptBlockError(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise CorruptBlockError(f"unsupported format version {version}")
    if json_len > MAX_JSON_BYTES:
        raise CorruptBlockError(f"header json length {json_len} exceeds {MAX_JSON_BYTES}")
    return HEADER_PREFIX_BYTES + json_len + _CRC.size


def read_header(f: BinaryIO) -> tuple[BlockHeader, int]:
    """Read and verify only the header of a stored block from a binary file at offset 0.

    Args:
        f: the block file, opened for binary reading.
    """
    prefix = f.read(HEADER_PREFIX_BYTES)
    return decode_header(prefix + f.read(header_size(prefix) - len(prefix)))


def decode_header(buf: bytes | memoryview) -> tuple[BlockHeader, int]:
    """Parse and verify a header; returns (header, header length in bytes).

    Args:
        buf: the stored bytes from offset 0; may hold the payload too, or only the header.
    """
    size = header_size(buf)
    if len(buf) < size:
        raise CorruptBlockError(f"truncated header: {len(buf)} of {size} bytes")
    (stored_crc,) = _CRC.unpack_from(buf, size - _CRC.size)
    if zlib.crc32(buf[: size - _CRC.size]) != stored_crc:
        raise CorruptBlockError("header checksum mismatch")
    try:
        meta = json.loads(bytes(buf[HEADER_PREFIX_BYTES : size - _CRC.size]))
        header = BlockHeader(
            key=bytes.fromhex(meta["key"]),
            shape=tuple(int(d) for d in meta["shape"]),
            dtype=str(meta["dtype"]),
            num_layers=int(meta["num_layers"]),
            payload_bytes=int(meta["payload_bytes"]),
            checksum=int(meta["checksum"]),
        )
        alg = meta["checksum_alg"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptBlockError(f"malformed header json: {e}") from e
    if alg != CHECKSUM or header.dtype not in DTYPES or len(header.key) != KEY_BYTES:
        raise CorruptBlockError(f"bad header fields: {alg}, {header.dtype}, {header.key.hex()}")
    if not header.shape or min(header.shape) < 0 or header.num_layers != header.shape[0]:
        raise CorruptBlockError(f"num_layers {header.num_layers} != shape {header.shape}")
    return header, size


def decode_block(
    data: bytes | bytearray | memoryview, expect_key: bytes | None = None
) -> torch.Tensor:
    """Verify a stored block and rebuild its tensor (which owns its memory, writable).

    Args:
        data: the whole stored block (header and payload). A `bytearray` is adopted without a
            copy (the tensor then shares its memory; the caller must not reuse it).
        expect_key: the key the caller asked for; a block stored under another key is corrupt.
    """
    header, offset = decode_header(data)
    if expect_key is not None and header.key != expect_key:
        raise CorruptBlockError(f"key mismatch: stored {header.key.hex()}, not {expect_key.hex()}")
    numel, dtype = math.prod(header.shape), DTYPES[header.dtype]
    if numel * dtype.itemsize != header.payload_bytes:
        raise CorruptBlockError(f"{header.shape} x {header.dtype} != {header.payload_bytes} bytes")
    payload = memoryview(data)[offset:]
    if len(payload) != header.payload_bytes:
        n, want = len(payload), header.payload_bytes
        raise CorruptBlockError(f"payload is {n} bytes, expected {want} (truncated file?)")
    if zlib.crc32(payload) != header.checksum:
        raise CorruptBlockError("payload checksum mismatch")
    if numel == 0:
        return torch.empty(header.shape, dtype=dtype)
    if isinstance(data, bytearray):
        flat = torch.frombuffer(data, dtype=dtype, count=numel, offset=offset)
    else:
        flat = torch.frombuffer(bytearray(payload), dtype=dtype)
    return flat.reshape(header.shape)
