"""The implementations of the dispersive term that the benchmarks compare, and their passes.

Providers (all InfoNCE-L2, tau = 1, squared distances divided by D: the release's loss):

    release        kernels.release_dispersive_loss: the release's pdist formulation, unfused
                   (pdist has no 16-bit kernels; bf16/fp16 input is cast to fp32 first, as
                   autocast does for pdist, and the cast is part of the timed pass)
    torch_compile  the same function under torch.compile (compiled once per shape)
    torch_gram     kernels.dispersive_loss(backend="torch"): the Gram path, this project's CPU path
    triton         kernels.dispersive_loss(backend="triton"): the fused kernels (CUDA only)

Passes (``MODES``): ``forward`` (z requires grad, as in training), ``backward`` (the
forward runs in the untimed setup) and ``forward_backward``. ``timed_pass`` returns the
(setup, run) pair that ``benchmark.pedantic`` takes; ``run`` synchronises the device.

``release_term()`` swaps the objective's dispersive call for the release formulation, so
a training step can run the same model on the same batch with either implementation.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

import kernels
from kernels import dispersive_loss, release_dispersive_loss
from kernels.fused.timing import triton_version

from .timing import flush_l2, synchronize

PROVIDERS: tuple[str, ...] = ("release", "torch_compile", "torch_gram", "triton")
MODES: tuple[str, ...] = ("forward", "backward", "forward_backward")
LossFn = Callable[[torch.Tensor], torch.Tensor]


def release_loss(z: torch.Tensor) -> torch.Tensor:
    """The release's loss for any float dtype: 16-bit input goes through pdist in fp32."""
    return release_dispersive_loss(z if z.dtype in (torch.float32, torch.float64) else z.float())


def unavailable_reason(provider: str, device: torch.device | str) -> str | None:
    """Why ``provider`` cannot run on ``device`` (None when it can)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    device = torch.device(device)
    if provider == "triton":
        if device.type != "cuda":
            return f"the triton provider runs the fused kernels on a CUDA device; this run's device is {device.type}"
        if triton_version() is None:
            return "the triton provider needs the triton package, which is not installed"
    return None


@dataclass
class _CompiledRelease:
    """``torch.compile(release_loss)`` with static shapes, compiled once per shape.

    The first forward+backward call at a new (shape, dtype, device) is timed as its compile
    time. Dynamo keeps one specialisation per shape up to its recompile limit (8), beyond
    which it would silently fall back to eager; so after ``MAX_SHAPES`` shapes the caches are
    reset and compiling starts afresh. The benchmarks visit the cases shape by shape.
    """

    MAX_SHAPES = 4
    compiled: dict = field(default_factory=dict)   # key -> (compiled fn, compile seconds)

    def get(self, z: torch.Tensor) -> tuple[LossFn, float]:
        key = (tuple(z.shape), z.dtype, z.device)
        if key not in self.compiled:
            if len(self.compiled) >= self.MAX_SHAPES:
                torch._dynamo.reset()
                self.compiled.clear()
            fn = torch.compile(release_loss, dynamic=False)
            probe = z.detach().clone().requires_grad_(True)
            synchronize(z.device)
            start = time.perf_counter()
            torch.autograd.grad(fn(probe), probe)  # traces and compiles the forward and backward graphs
            synchronize(z.device)
            self.compiled[key] = (fn, time.perf_counter() - start)
        return self.compiled[key]


_COMPILED = _CompiledRelease()


def loss_fn(provider: str, z: torch.Tensor) -> tuple[LossFn, float | None]:
    """(loss function of z, compile seconds or None) for ``provider`` at z's shape."""
    reason = unavailable_reason(provider, z.device)
    if reason:
        raise RuntimeError(reason)
    if provider == "release":
        return release_loss, None
    if provider == "torch_compile":
        return _COMPILED.get(z)
    backend = "torch" if provider == "torch_gram" else "triton"
    return (lambda x: dispersive_loss(x, backend=backend)), None


def timed_pass(fn: LossFn, z: torch.Tensor, mode: str, *, sync: bool = True
               ) -> tuple[Callable[[], tuple[tuple, dict]], Callable[..., object]]:
    """(setup, run) of one pass for ``benchmark.pedantic(run, setup=setup)``.

    setup does the untimed part (the forward of ``backward``; the L2 flush on CUDA) and
    ends with the device idle; run does the timed part and synchronises before returning
    (``sync=False``: it does not, for timing with CUDA events, where a host sync inside the
    timed interval would add its latency).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    device = z.device

    def setup() -> tuple[tuple, dict]:
        args: tuple = (fn(z),) if mode == "backward" else ()
        flush_l2(device)
        synchronize(device)
        return args, {}

    def run(*args):
        if mode == "forward":
            out = fn(z)
        elif mode == "backward":
            out = torch.autograd.grad(args[0], z)
        else:
            out = torch.autograd.grad(fn(z), z)
        if sync:
            synchronize(device)  # the timed call ends when the device is done
        return out

    return setup, run


@contextlib.contextmanager
def release_term() -> Iterator[None]:
    """Inside, ``engine.objectives.base`` computes the dispersive term with the release's pdist code.

    The objective calls ``kernels.dispersive_loss_groups`` (and code may call
    ``kernels.dispersive_loss``) through the module at call time, so swapping those
    attributes changes the implementation and nothing else: same model, same batch, same
    blocks, same weights; the release's way is one pdist call per block. Only the release's
    own loss (InfoNCE-L2 over D) exists.
    """
    originals = (kernels.dispersive_loss, kernels.dispersive_loss_groups)

    def release(z: torch.Tensor, *, variant: str = "infonce_l2", tau: float = 1.0,
                normalize_by_dim: bool = True, **_backend_options) -> torch.Tensor:
        if variant != "infonce_l2" or not normalize_by_dim:
            raise ValueError("the release implements only InfoNCE-L2 with distances divided by D, "
                             f"got variant={variant!r}, normalize_by_dim={normalize_by_dim}")
        return release_dispersive_loss(z, tau)

    def release_groups(zs, **options) -> torch.Tensor:
        return torch.stack([release(z, **options) for z in zs])

    kernels.dispersive_loss, kernels.dispersive_loss_groups = release, release_groups
    try:
        yield
    finally:
        kernels.dispersive_loss, kernels.dispersive_loss_groups = originals
