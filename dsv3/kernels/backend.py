"""The backend switch shared by every kernel: "auto", "torch" or "triton".

Every op in `dsv3.kernels` exists twice: `<op>_torch`, a pure-torch reference that runs anywhere and is
differentiable, and `<op>_triton`, the fused Triton kernel. The public `<op>` asks `use_triton(...)` which
one to run:

- "torch": always the reference.
- "triton": always the kernel. Triton must be importable, and the tensors must live on a CUDA device, unless
  `TRITON_INTERPRET=1` is set (then Triton's interpreter runs the kernel on the CPU, which is how the tests
  compare the two paths on a machine without a GPU).
- "auto" (default): the kernel when the tensors are on CUDA, Triton is importable and the GPU supports the
  dtype (bf16 needs compute capability 8.0; Colab's T4 has 7.5 and runs bf16 through torch), else the reference.

The choice is state of the calling thread or context, not a global: it lives in a `contextvars.ContextVar`, so
`with use_backend("torch"):` in one thread (or asyncio task) does not change what another one runs, and
`set_backend(name)` sets it for the calling context (a new thread starts from the default). The default is
"auto", or the environment variable `DSV3_KERNEL_BACKEND` read at import.

Triton is imported lazily: `import dsv3.kernels` works on an install without Triton, and the modules that
define the `@triton.jit` kernels (`*_triton.py`) are imported on first use. Lazy import also matters for the
interpreter, since `triton.jit` decides between the compiler and the interpreter when a kernel is defined.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "triton")

_default = os.environ.get("DSV3_KERNEL_BACKEND", "auto")
if _default not in BACKENDS:
    raise ValueError(f"DSV3_KERNEL_BACKEND={_default!r}: expected one of {BACKENDS}")
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("dsv3_kernel_backend", default=_default)
_triton_ok: bool | None = None  # cached result of trying to import triton


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r}: expected one of {BACKENDS}")
    if name == "triton":
        require_triton()
    return name


def set_backend(name: str) -> None:
    """Choose the kernel backend of every op for the calling thread or context: "auto", "torch" or "triton"."""
    _backend.set(_checked(name))


def get_backend() -> str:
    """The calling context's backend (default "auto", or `DSV3_KERNEL_BACKEND`)."""
    return _backend.get()


@contextlib.contextmanager
def use_backend(name: str):
    """`with use_backend("torch"): ...` runs the block with another backend and restores the old one (for this
    thread or context only)."""
    token = _backend.set(_checked(name))
    try:
        yield
    finally:
        _backend.reset(token)


def triton_available() -> bool:
    """True when `import triton` works (cached after the first call)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            importlib.import_module("triton")
            importlib.import_module("triton.language")
            _triton_ok = True
        except Exception:  # ImportError, or a broken install raising anything else
            _triton_ok = False
    return _triton_ok


def _reset_triton_cache() -> None:
    """Forget the cached import result (tests that hide triton use this)."""
    global _triton_ok
    _triton_ok = None


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def require_triton() -> None:
    if not triton_available():
        raise RuntimeError(
            "dsv3.kernels backend 'triton' needs the triton package, which is not importable here; "
            "install it (pip install 'dsv3[gpu]') or use set_backend('torch') / set_backend('auto')"
        )


def _device_supports(t: torch.Tensor) -> bool:
    """Whether the GPU holding `t` can run our Triton kernels on its dtype."""
    if not t.is_cuda:
        return interpret_mode()
    if t.dtype == torch.bfloat16:
        return torch.cuda.get_device_capability(t.device) >= (8, 0)
    return True


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Decide, for one call, whether to run the Triton kernel on these tensors (None entries are skipped)."""
    name = _backend.get()
    if name == "torch":
        return False
    if name == "auto":  # a plain loop: this runs for every op of every step, and a CPU tensor ends it at once
        for t in tensors:
            if t is not None and not (t.is_cuda and _device_supports(t)):
                return False
        return triton_available()
    # explicit "triton": run it or say precisely why not
    require_triton()
    for t in tensors:
        if t is None:
            continue
        if not t.is_cuda and not interpret_mode():
            raise RuntimeError(
                f"dsv3.kernels backend 'triton' got a tensor on {t.device}: Triton kernels run on CUDA tensors, "
                "or on the CPU only with TRITON_INTERPRET=1 set before triton is imported"
            )
        if t.is_cuda and not _device_supports(t):
            raise RuntimeError(
                f"dsv3.kernels backend 'triton': {t.dtype} is not supported on "
                f"{torch.cuda.get_device_name(t.device)} (compute capability "
                f"{torch.cuda.get_device_capability(t.device)}); use float16 there, or backend 'auto'"
            )
    return True


def load(module: str):
    """Import `dsv3.kernels.<module>` (a file of @triton.jit kernels) on first use."""
    require_triton()
    return importlib.import_module(f"dsv3.kernels.{module}")


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
