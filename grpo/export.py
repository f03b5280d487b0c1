"""A training checkpoint as a plain Hugging Face folder: weights, config, tokenizer, chat template.

Checkpoints keep the trainer's own state (in-memory parameter names, optimizer moments, RNG); the
export is what a user takes away: `AutoModelForCausalLM.from_pretrained(DIR)` loads it, vLLM serves
it (`trainer.py config.yaml --serve --set model.name=DIR`). A LoRA checkpoint is merged into the
base weights, so the folder needs no PEFT to load. Weights are saved in the base model's own dtype.

    python trainer.py config.yaml --export DIR                       # the run's latest checkpoint
    python trainer.py config.yaml --export DIR --checkpoint PATH     # any checkpoint folder
"""

from __future__ import annotations

import shutil
from pathlib import Path

from grpo.lora import LoraSettings, load_adapter_state, with_lora

# A run's checkpoints: runs/<name>/checkpoints/step_NNNNNN/{policy/, loop.json} (grpo/loop.py writes them)
CHECKPOINTS = "checkpoints"
POLICY = "policy"  # a step checkpoint's subfolder with the trainer's weights


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((Path(run_dir) / CHECKPOINTS).glob("step_*"))
    return found[-1] if found else None


class ExportError(ValueError):
    pass


def policy_dir(checkpoint: Path) -> Path:
    """The weights folder of a step checkpoint (`checkpoints/step_N`), or the folder itself."""
    checkpoint = Path(checkpoint)
    inner = checkpoint / POLICY
    if inner.is_dir():
        return inner
    if any(checkpoint.glob("*.safetensors")):
        return checkpoint
    raise ExportError(f"{checkpoint} is not a checkpoint: no {POLICY}/ and no *.safetensors in it")


def export_checkpoint(checkpoint: Path, base_model: str, out: Path, lora: LoraSettings | None = None) -> Path:
    """Write `out` (atomically: complete or absent) from a checkpoint trained from `base_model`."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = policy_dir(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    dtype = getattr(model.config, "dtype", None) or torch.float32  # the base's saved dtype
    if lora is not None:
        peft_model = with_lora(model, lora)
        load_adapter_state(peft_model, src)
        model = peft_model.merge_and_unload()
    else:
        state: dict[str, torch.Tensor] = {}
        for f in sorted(src.glob("*.safetensors")):
            state.update(load_file(f))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ExportError(f"{src} does not match {base_model}: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]} (was it trained with model.lora set?)")
    model = model.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype)))
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # the original checkpoint layout: what vLLM and from_pretrained read
    AutoTokenizer.from_pretrained(base_model).save_pretrained(tmp)  # with its chat template
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
