"""The fused Triton kernels: the only package of the repository that imports triton.

    tiles    the tile table and limits (no triton: the roofline reads it too)
    jit      the ``@triton.jit`` kernels
    launch   host launchers: check z, allocate, launch (``forward``, ``backward``, ``gram``)
    aot      the ahead-of-time compile gate (``python -m kernels.check``)
    timing   what the benchmarks take from triton: its version, kernel time (``do_bench``)

Importing this package imports nothing: triton is first imported with ``jit`` (through
``launch``), so that ``TRITON_INTERPRET`` can still be set until the first call.
"""
