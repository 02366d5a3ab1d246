"""kernels.host_memory: pooled CPU buffers are reused only when nothing holds them."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import dispersive_loss, host_memory

BIG = (32, 65_536)            # 8 MiB of fp32: the smallest size that is pooled


@pytest.fixture(autouse=True)
def empty_pool():
    host_memory.clear()
    yield
    host_memory.clear()


def test_small_tensors_are_plain_allocations():
    t = host_memory.empty((4, 5), torch.float32, "cpu")
    assert t.shape == (4, 5) and t.dtype == torch.float32 and host_memory.pooled_bytes() == 0


def test_a_buffer_is_reused_only_after_its_tensor_is_gone():
    a = host_memory.empty(BIG, torch.float32, "cpu")
    b = host_memory.empty(BIG, torch.float32, "cpu")     # a is alive: a second buffer
    assert a.data_ptr() != b.data_ptr()
    assert host_memory.pooled_bytes() == 2 * a.nbytes
    ptr = a.data_ptr()
    del a
    c = host_memory.empty(BIG, torch.float32, "cpu")
    assert c.data_ptr() == ptr


def test_a_view_keeps_its_buffer_in_use():
    a = host_memory.empty(BIG, torch.float32, "cpu")
    view = a[3:]  # noqa: F841 (held on purpose)
    ptr = a.data_ptr()
    del a
    assert host_memory.empty(BIG, torch.float32, "cpu").data_ptr() != ptr


def test_when_every_slot_is_used_the_tensor_is_not_pooled():
    held = [host_memory.empty(BIG, torch.float32, "cpu") for _ in range(host_memory.SLOTS)]
    extra = host_memory.empty(BIG, torch.float32, "cpu")
    assert extra.shape == BIG and all(extra.data_ptr() != h.data_ptr() for h in held)
    assert host_memory.pooled_bytes() == host_memory.SLOTS * extra.nbytes


def test_pool_size_is_capped(monkeypatch):
    monkeypatch.setattr(host_memory, "POOL_BYTES", 10 << 20)
    a = host_memory.empty(BIG, torch.float32, "cpu")
    b = host_memory.empty(BIG, torch.float32, "cpu")
    assert host_memory.pooled_bytes() == a.nbytes and b.shape == BIG


def test_other_dtypes_and_shapes_are_contiguous_tensors_not_views():
    t = host_memory.empty((3, 2, 1 << 21), torch.bfloat16, "cpu")
    assert t.dtype == torch.bfloat16 and t.shape == (3, 2, 1 << 21)
    assert t.is_contiguous() and t._base is None and t.storage_offset() == 0
    t.fill_(1.5)
    assert t.float().sum().item() == 1.5 * t.numel()


def test_clear_keeps_buffers_in_use_valid():
    a = host_memory.empty(BIG, torch.float32, "cpu").fill_(7.0)
    ptr = a.data_ptr()
    del a
    b = host_memory.empty(BIG, torch.float32, "cpu").fill_(3.0)   # reuses a's buffer
    assert b.data_ptr() == ptr
    host_memory.clear()
    assert host_memory.pooled_bytes() == b.nbytes             # in use: still counted
    assert torch.all(b == 3.0)
    del b
    host_memory.clear()
    assert host_memory.pooled_bytes() == 0


def test_a_gradient_the_caller_keeps_is_never_overwritten(rng):
    """Two backward passes of the CPU path: the first gradient, still held, keeps its values."""
    z1 = torch.randn(BIG, generator=rng).requires_grad_()
    z2 = (torch.randn(BIG, generator=rng) * 3).requires_grad_()
    g1, = torch.autograd.grad(dispersive_loss(z1, backend="torch"), z1)
    kept = g1.clone()
    for _ in range(3):   # more calls than slots: every later gradient needs other memory
        g2, = torch.autograd.grad(dispersive_loss(z2, backend="torch"), z2)
        assert g2.data_ptr() != g1.data_ptr()
    torch.testing.assert_close(g1, kept, rtol=0, atol=0)
    assert host_memory.pooled_bytes() > 0   # the gradients did come from the pool


def test_a_resized_storage_is_still_a_valid_buffer():
    a = host_memory.empty(BIG, torch.float32, "cpu")
    a.untyped_storage().resize_(0)      # what sharded training does to free a tensor's memory
    del a
    b = host_memory.empty(BIG, torch.float32, "cpu").fill_(2.0)
    assert b.untyped_storage().nbytes() == b.nbytes and torch.all(b == 2.0)


def test_a_storage_moved_to_shared_memory_leaves_the_pool():
    a = host_memory.empty(BIG, torch.float32, "cpu")
    a.share_memory_()                   # other processes may map it now
    del a
    assert not host_memory.empty(BIG, torch.float32, "cpu").is_shared()


def test_a_kept_storage_object_keeps_its_buffer_in_use():
    a = host_memory.empty(BIG, torch.float32, "cpu")
    storage, ptr = a.untyped_storage(), a.data_ptr()
    del a
    assert host_memory.empty(BIG, torch.float32, "cpu").data_ptr() != ptr
    del storage


def test_idle_buffers_of_sizes_not_asked_for_lately_are_freed():
    sizes = [(32, 65_536 + 1024 * k) for k in range(3)]
    nbytes = [math.prod(s) * 4 for s in sizes]
    for shape in sizes:
        host_memory.empty(shape, torch.float32, "cpu")      # dropped at once: idle
    assert host_memory.pooled_bytes() == nbytes[1] + nbytes[2]


def test_a_forward_without_backward_holds_no_memory(rng):
    z = torch.randn(BIG, generator=rng)
    with torch.no_grad():
        dispersive_loss(z.requires_grad_(), backend="torch")
    assert host_memory.pooled_bytes() == 0
