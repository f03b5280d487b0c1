"""LoRA adapters with PEFT: what the trainer trains and what vLLM serves when `model.lora` is set.

The adapter is saved in PEFT's folder layout (`adapter_config.json`, `adapter_model.safetensors`),
which is at once the checkpoint of the trained parameters and what vLLM's LoRA loader reads: the
weight push writes a few MB instead of the whole model, and the base weights in vLLM never change.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # config.yaml is validated before torch is imported
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The projections vLLM's LoRA layers cover in every decoder layer (attention and MLP).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(BaseModel):
    """`model.lora` in config.yaml; absent (null): full fine-tuning."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    r: int = Field(default=16, ge=1, le=512)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)   # > 0 makes the trainer's logprobs noisier than the engine's
    target_modules: tuple[str, ...] = Field(default=DEFAULT_TARGETS, min_length=1)


def with_lora(model: torch.nn.Module, s: LoraSettings) -> Any:
    """Wrap `model` in a PeftModel; its LoRA layers replace the targets in place, so `model` itself
    (`peft.base_model.model`) now trains only the adapters."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules),
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def save_adapter(peft_model: Any, folder: Path) -> None:
    peft_model.save_pretrained(folder)


def load_adapter_state(peft_model: Any, folder: Path) -> None:
    """Load a saved adapter into `peft_model`; every one of its LoRA tensors must be in the file."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a LoRA checkpoint (was it trained without model.lora?)")
    result = set_peft_model_state_dict(peft_model, load_file(path))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: adapter does not match model.lora: missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")
