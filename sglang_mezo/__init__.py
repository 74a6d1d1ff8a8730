"""sglang-mezo: fine-tune the model an SGLang server is serving, in place, with MeZO.

Layers, each importing only those below it: ``kernels`` (z from a seed, in place) -> ``core`` (the SPSA step,
schedules, objectives, trajectory log) -> ``engines`` (a plain transformers engine for the core).
"""

__version__ = "0.1.0"
