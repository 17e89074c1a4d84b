"""BlockPool tests: allocation and refcounts, exhaustion leaving state unchanged, writes/gathers, copy-on-write."""
import pytest
import torch

from kvpress.paged.pool import BlockPool

QUANT_FIELDS = {
    "k": (8, torch.uint8),
    "k_scale": (2, torch.float16),
    "k_zero": (2, torch.float16),
    "v": (4, torch.uint8),
    "v_scale": (2, torch.float16),
    "v_zero": (2, torch.float16),
}


def make_pool(num_pages=8, num_layers=2, heads=3, page_size=4, fields=None) -> BlockPool:
    return BlockPool(num_pages, num_layers, heads, fields or {"k": (5, torch.float32), "v": (5, torch.float32)},
                     page_size)


def random_fields(pool: BlockPool, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (width, dtype) in pool.field_specs.items():
        if dtype == torch.uint8:
            out[name] = torch.randint(0, 256, (pool.num_kv_heads, n, width), generator=g, dtype=torch.uint8)
        else:
            out[name] = torch.randn(pool.num_kv_heads, n, width, generator=g).to(dtype)
    return out


def test_alloc_refcounts_and_free_list():
    pool = make_pool()
    pages = pool.alloc(3)
    assert len(set(pages)) == 3 and pool.pages_used == 3 and pool.pages_free == 5
    assert all(pool.refcount(p) == 1 for p in pages)
    pool.incref(pages[:1])
    assert pool.pages_shared == 1
    assert pool.decref(pages) == 2  # pages[0] still has one owner
    assert pool.pages_used == 1 and pool.refcount(pages[0]) == 1
    assert pool.decref([pages[0]]) == 1
    assert pool.pages_used == 0
    pool.check_invariants()


def test_exhaustion_raises_and_leaves_state_unchanged():
    pool = make_pool(num_pages=4)
    held = pool.alloc(3)
    free_before = list(pool._free)
    with pytest.raises(RuntimeError, match=r"2 pages requested, 1 free of 4.*raise the pool size"):
        pool.alloc(2)
    assert pool._free == free_before and pool.pages_used == 3
    pool.check_invariants()
    (last,) = pool.alloc(1)  # the next call works
    assert last not in held and pool.pages_free == 0
    pool.decref(held + [last])
    assert pool.pages_free == 4
    pool.check_invariants()


def test_bad_refcount_operations_are_rejected_atomically():
    pool = make_pool()
    (p,) = pool.alloc(1)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.decref([p, p])
    assert pool.refcount(p) == 1
    with pytest.raises(RuntimeError, match="free page"):
        pool.incref([p, 7])
    assert pool.refcount(p) == 1
    with pytest.raises(ValueError, match="out of range"):
        pool.decref([8])
    with pytest.raises(ValueError, match=">= 0"):
        pool.alloc(-1)
    pool.check_invariants()


@pytest.mark.parametrize("start, n", [(0, 12), (2, 9), (5, 3), (4, 8), (1, 2)])
def test_write_tokens_across_pages_and_gather_round_trip(start, n):
    pool = make_pool(fields=QUANT_FIELDS)
    pages = pool.alloc(3)
    values = random_fields(pool, n)
    pool.write_tokens(1, values, pages, start=start)  # tokens land at positions start..start+n-1 of the 3 pages
    got = pool.gather(1, pages, start + n)
    for name, value in values.items():
        assert got[name].shape == (3, start + n, pool.field_specs[name][0]) and got[name].dtype == value.dtype
        assert torch.equal(got[name][:, start:], value)
        assert not got[name][:, :start].any()  # positions before `start` untouched
    untouched = pool.gather(0, pages)
    assert all(not t.any() for t in untouched.values())  # other layer unchanged
    with pytest.raises(ValueError, match="do not fit in 3 pages"):
        pool.write_tokens(1, random_fields(pool, 13 - start), pages, start=start)
    with pytest.raises(ValueError, match="repeat"):
        pool.write_tokens(1, random_fields(pool, 8), [pages[0], pages[0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_write_gather_on_cuda():
    pool = BlockPool(16, 1, 2, QUANT_FIELDS, page_size=4, device="cuda")
    pages = pool.alloc(4)[::-1]
    values = {k: v.cuda() for k, v in random_fields(pool, 14).items()}
    pool.write_tokens(0, values, pages, start=1)
    got = pool.gather(0, pages, 15)
    assert all(torch.equal(got[k][:, 1:], v) for k, v in values.items())


def test_write_into_one_page_slot():
    pool = make_pool()
    (p,) = pool.alloc(1)
    first, second = random_fields(pool, 1, seed=1), random_fields(pool, 3, seed=2)
    pool.write(0, first, p, slot=0)
    pool.write(0, second, p, slot=1)
    got = pool.gather(0, [p])
    assert torch.equal(got["k"][:, :1], first["k"]) and torch.equal(got["v"][:, 1:], second["v"])
    with pytest.raises(ValueError, match="overflows a page of 4"):
        pool.write(0, random_fields(pool, 2), p, slot=3)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"k": torch.zeros(3, 2, 5)}, "fields"),
        ({"k": torch.zeros(3, 2, 5), "v": torch.zeros(3, 2, 4)}, r"expected \(3, 2, 5\)"),
        ({"k": torch.zeros(3, 2, 5), "v": torch.zeros(3, 2, 5, dtype=torch.float16)}, "float32"),
        ({"k": torch.zeros(3, 2, 5), "v": torch.zeros(3, 1, 5)}, "same n"),
    ],
)
def test_write_rejects_bad_fields(values, message):
    pool = make_pool()
    pages = pool.alloc(1)
    with pytest.raises(ValueError, match=message):
        pool.write_tokens(0, values, pages)


def test_writes_and_reads_need_ownership():
    pool = make_pool()
    (p,) = pool.alloc(1)
    pool.incref([p])
    with pytest.raises(RuntimeError, match="copy_on_write"):
        pool.write_tokens(0, random_fields(pool, 1), [p])
    pool.decref([p, p])
    with pytest.raises(RuntimeError, match="free page"):
        pool.gather(0, [p])


def test_copy_on_write_copies_every_layer_and_field():
    pool = make_pool(fields=QUANT_FIELDS)
    (p,) = pool.alloc(1)
    for layer in range(pool.num_layers):
        pool.write_tokens(layer, random_fields(pool, 4, seed=layer), [p])
    assert pool.copy_on_write(p) == p  # sole owner: no copy needed
    pool.incref([p])  # a second owner shares it
    q = pool.copy_on_write(p)
    assert q != p and pool.refcount(p) == 1 and pool.refcount(q) == 1
    for layer in range(pool.num_layers):
        a, b = pool.gather(layer, [p]), pool.gather(layer, [q])
        assert all(torch.equal(a[name], b[name]) for name in a)
    before = pool.gather(0, [p])
    pool.write_tokens(0, random_fields(pool, 4, seed=9), [q])  # writing the copy leaves the original alone
    assert all(torch.equal(before[name], pool.gather(0, [p])[name]) for name in before)
    pool.check_invariants()


def test_copy_on_write_when_exhausted_keeps_sharing():
    pool = make_pool(num_pages=1)
    (p,) = pool.alloc(1)
    pool.incref([p])
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.copy_on_write(p)
    assert pool.refcount(p) == 2
    pool.check_invariants()


def test_nbytes_counts_real_tensor_bytes():
    pool = make_pool(num_pages=6, num_layers=2, heads=3, page_size=4, fields=QUANT_FIELDS)
    per_token_head = 8 * 1 + 2 * 2 + 2 * 2 + 4 * 1 + 2 * 2 + 2 * 2
    assert pool.nbytes() == 2 * 6 * 3 * 4 * per_token_head
    assert pool.nbytes() == sum(t.numel() * t.element_size() for t in pool.tensors())


def test_check_invariants_detects_corruption():
    pool = make_pool()
    pages = pool.alloc(2)
    pool._refcount[pages[0]] = 0  # referenced by nobody but not free: leaked
    with pytest.raises(RuntimeError, match="not in the free list"):
        pool.check_invariants()
    pool._refcount[pages[0]] = 1
    pool._free.append(pool._free[-1])
    with pytest.raises(RuntimeError, match="more than once"):
        pool.check_invariants()


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_pages"):
        BlockPool(0, 1, 1, {"k": (4, torch.float16)})
    with pytest.raises(ValueError, match="at least one field"):
        BlockPool(4, 1, 1, {})
    with pytest.raises(ValueError, match="'k'"):
        BlockPool(4, 1, 1, {"k": (0, torch.float16)})
