"""Block keys: the identity of a block of KV in every tier.

A key is a 16-byte BLAKE2b digest chained over the previous block's key and this block's
token ids. The chain is rooted in (model id, tenant salt), so:
  * equal keys imply equal whole prefixes (not just equal blocks),
  * a different model or tenant never shares a key (no cross-tenant cache hits).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

KEY_BYTES = 16


def root_key(model_id: str, tenant_salt: bytes = b"") -> bytes:
    """The key every chain starts from: binds all keys to a model and a tenant.

    Args:
        model_id: stable identifier of the model weights (e.g. the model directory name).
        tenant_salt: server-side secret per tenant (empty for the shared default tenant).
    """
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"dps-root")
    h.update(len(model_id).to_bytes(4, "little"))
    h.update(model_id.encode())
    h.update(tenant_salt)
    return h.digest()


def chain_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Key of a full block whose predecessor has key `parent`.

    Args:
        parent: the previous block's key, or `root_key(...)` for the first block.
        token_ids: the block's token ids (exactly one block's worth).
    """
    h = hashlib.blake2b(parent, digest_size=KEY_BYTES, person=b"dps-blk")
    h.update(array("I", token_ids).tobytes())
    return h.digest()


def chain_keys(root: bytes, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of every *full* block of `token_ids`, in order (a partial tail block has none)."""
    keys: list[bytes] = []
    parent = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_key(parent, token_ids[start : start + block_size])
        keys.append(parent)
    return keys
