"""The temporary switches MeanFlow's target passes run under: a JVP through the model.

``torch.func.jvp`` needs forward-mode rules everywhere on its path: SDPA's math kernel instead
of the fused ones (``jvp_attention``), torch's own ``F.linear`` instead of DeepSpeed's ZeRO-3
replacement (``plain_linear``), and whole parameters with ZeRO-3's per-module hooks set aside
(``gathered_parameters``). ``target_passes`` combines them with no-grad and labels as given.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from models import labels_as_given, unwrap_model
from models.dit import Attention


@contextlib.contextmanager
def jvp_attention(module: torch.nn.Module) -> Iterator[None]:
    """Attention that has forward-mode derivatives: SDPA with its math kernel.

    SDPA's flash / memory-efficient kernels (CPU and CUDA) and flash-attn implement no
    forward-mode AD; layers using them are switched to SDPA for the duration, and the math
    kernel is forced. Layers on the model's explicit "math" backend are left alone.
    """
    saved = []
    for layer in unwrap_model(module).modules():
        if isinstance(layer, Attention) and layer.backend != "math":
            saved.append((layer, layer.backend, layer._flash))
            layer.backend, layer._flash = "sdpa", None
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for layer, backend, flash in saved:
            layer.backend, layer._flash = backend, flash


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def _forward_hooks_suspended(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule's forward (pre-)hooks set aside for the duration, then put back."""
    saved = []
    for sub in module.modules():
        dicts = {name: getattr(sub, name) for name in _HOOK_DICTS if hasattr(sub, name)}
        saved.append((sub, dicts))
        for name, hooks in dicts.items():
            setattr(sub, name, type(hooks)())
    try:
        yield
    finally:
        for sub, dicts in saved:
            for name, hooks in dicts.items():
                setattr(sub, name, hooks)


@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Full parameters under ZeRO-3, whose module holds partitioned placeholders; a no-op else.

    Under ZeRO-3 the parameters are gathered once (``deepspeed.zero.GatheredParameters``) and
    ZeRO-3's per-submodule fetch/release hooks are suspended meanwhile: the parameters are
    already whole, the hooks wrap every submodule input in an autograd Function that has no
    forward-mode rule (a JVP through them fails), and passes outside the engine's own forward
    would only disturb ZeRO-3's record of the module order it prefetches by.
    """
    inner = unwrap_model(module)
    params = list(inner.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed  # heavy, and only needed under ZeRO-3

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None), _forward_hooks_suspended(inner):
        yield


@contextlib.contextmanager
def plain_linear() -> Iterator[None]:
    """torch's own ``F.linear`` for the duration.

    Once a ZeRO-3 engine exists, DeepSpeed's "memory-efficient linear" (on by default) has
    replaced ``torch.nn.functional.linear`` process-wide -- for every model, sharded or not --
    with an autograd Function that has no forward-mode rule. DeepSpeed keeps the original as
    ``linear_bk``; nothing to do when DeepSpeed's ZeRO-3 module was never imported.
    """
    patcher_module = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    patcher = getattr(patcher_module, "InsertPostInitMethodToModuleSubClasses", None)
    original = getattr(patcher, "linear_bk", None)
    current = F.linear
    if original is None or current is original:
        yield
        return
    F.linear = original
    try:
        yield
    finally:
        F.linear = current


@contextlib.contextmanager
def target_passes(module: torch.nn.Module, jvp: bool) -> Iterator[None]:
    """What the no-grad passes of the target run under; the JVP also needs forward-mode-safe
    attention and ``F.linear`` (the guidance forwards keep the fast kernels)."""
    with contextlib.ExitStack() as stack:
        for ctx in (torch.no_grad(), gathered_parameters(module), labels_as_given(module)):
            stack.enter_context(ctx)
        if jvp:
            stack.enter_context(plain_linear())
            stack.enter_context(jvp_attention(module))
        yield


def eager_forward(module: torch.nn.Module) -> Callable[..., Tensor]:
    """The unwrapped module's own forward: bypasses DeepSpeed and any ``nn.Module.compile``
    wrapper (compiled graphs do not take forward-mode dual tensors)."""
    return unwrap_model(module).forward
