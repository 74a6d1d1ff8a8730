"""SGLang's LoRA on a machine without CUDA: host tensors it asks to pin stay plain host tensors.

SGLang 0.5.23's LoRA layers and its torch-native LoRA backend create their host-side index tensors with
``pin_memory=True`` (``lora/layers.py``, ``lora/backend/torch_backend.py``; SGLang issue 31894, closed unfixed), and
pinning needs a CUDA driver: without one, ``--enable-lora`` cannot start. Pinning page-locks host memory so that
copies to a GPU can be asynchronous; with no GPU there is nothing to copy to, so an unpinned tensor is the same
tensor. :func:`pinning_off` makes exactly that substitution, and only while the LoRA manager's own methods run
(the hooks in :data:`sglang_mezo.plugin.internals.CPU_LORA_HOOKS`), only in a process without CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

FACTORIES = ("tensor", "empty", "zeros", "ones", "full")
"""The torch factories SGLang's LoRA code passes ``pin_memory=True`` to (0.5.23: tensor, empty, zeros)."""
_lock = threading.Lock()
_inside = 0
_saved: tuple = ()


def _unpinned(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def make(*args, pin_memory: bool = False, **kwargs):
        return factory(*args, **kwargs)

    return make


@contextlib.contextmanager
def pinning_off() -> Iterator[None]:
    """While inside: the :data:`FACTORIES` called with ``pin_memory=True``, and ``Tensor.pin_memory()``, give unpinned
    host tensors. Re-entrant (the first to enter patches, the last to leave
    restores); a no-op where CUDA is available."""
    global _inside, _saved
    import torch

    if torch.cuda.is_available():
        yield
        return
    with _lock:
        if _inside == 0:
            _saved = (torch.Tensor.pin_memory, {name: getattr(torch, name) for name in FACTORIES})
            for name, factory in _saved[1].items():
                setattr(torch, name, _unpinned(factory))
            torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                torch.Tensor.pin_memory = _saved[0]
                for name, factory in _saved[1].items():
                    setattr(torch, name, factory)


def around_without_pinning(original: Callable, *args, **kwargs):
    """An AROUND hook: the LoRA manager's method, with pinning off."""
    with pinning_off():
        return original(*args, **kwargs)
