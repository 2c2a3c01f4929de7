"""LoRA / QLoRA adapters on a causal LM, seeded so the same spec gives the same adapter anywhere.

QLoRA is not a separate path: it is this same wrapping applied to a base loaded with
`quantize='nf4'` (see `engine.models.load`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import LoraSpec
from engine.errors import SiftError


def add_lora(model, spec: LoraSpec):
    """Wrap `model` with a freshly initialised, seeded LoRA; only adapter weights are trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        layers_to_transform=spec.layers,
        task_type="CAUSAL_LM",
    )
    devices = [model.device] if model.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise SiftError(f"cannot add LoRA: {str(exc).splitlines()[0]}") from None


def load_adapter(model, adapter: str | Path, trainable: bool = False):
    """Attach a saved PEFT adapter folder (safetensors) to `model`."""
    from peft import PeftModel

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise SiftError(f"{folder}: not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    except Exception as exc:  # peft raises assorted types for a mismatched adapter
        raise SiftError(f"{folder}: adapter does not fit this model ({str(exc).splitlines()[0]})") from None
