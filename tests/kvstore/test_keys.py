"""Block keys: hash chain properties the prefix cache and the KV store rely on."""

from __future__ import annotations

from kvstore.keys import KEY_BYTES, chain_key, chain_keys, root_key


def test_keys_cover_only_full_blocks():
    keys = chain_keys(root_key("m"), list(range(10)), block_size=4)
    assert len(keys) == 2 and all(len(k) == KEY_BYTES for k in keys)


def test_key_depends_on_whole_prefix_not_just_block():
    """Same block tokens after a different prefix -> different key (a hit is a prefix hit)."""
    root = root_key("m")
    a = chain_keys(root, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = chain_keys(root, [0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[1] != b[1]
    assert chain_key(a[0], [5, 6, 7, 8]) == a[1]


def test_model_and_tenant_enter_every_key():
    tokens = list(range(8))
    base = chain_keys(root_key("m", b"t1"), tokens, 4)
    assert chain_keys(root_key("m", b"t1"), tokens, 4) == base
    assert not set(base) & set(chain_keys(root_key("m", b"t2"), tokens, 4))
    assert not set(base) & set(chain_keys(root_key("other", b"t1"), tokens, 4))


def test_token_ids_are_not_ambiguous():
    root = root_key("m")
    assert chain_key(root, [1, 256]) != chain_key(root, [256, 1])
    assert chain_key(root, [1]) != chain_key(root, [1, 0])
