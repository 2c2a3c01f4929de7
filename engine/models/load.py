"""Load a local Hugging Face model folder with its tokenizer, safely.

Weights load from safetensors only (pickle-based `.bin` files can run code) and
`trust_remote_code` stays off unless the caller turns it on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch

from engine.errors import SiftError

Quantize = Literal["none", "nf4", "fp4"]


def check_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise SiftError(f"model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise SiftError(f"{folder}: not a Hugging Face model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise SiftError(f"{folder}: no .safetensors weights (sift loads safetensors only, never pickle .bin files)")
    return folder


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    quantize: Quantize = "none",
    trust_remote_code: bool = False,
):
    """A causal LM in eval mode; `quantize='nf4'` gives the 4-bit base of QLoRA (CPU or CUDA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = check_folder(path)
    kwargs = {}
    if quantize != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantize,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*kernels.*")
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
        )
    return model.eval()


def load_encoder(path: str | Path, trust_remote_code: bool = False):
    """A bare transformer encoder (e.g. a sentence-transformers folder's weights) in eval mode."""
    from transformers import AutoModel

    folder = check_folder(path)
    model = AutoModel.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=trust_remote_code)
    return model.eval()
