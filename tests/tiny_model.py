"""A tiny, real model for fast tests: 2-layer Qwen2 shape (hidden 256 = 4 heads x head_dim 64;
vLLM assumes heads x head_dim == hidden) with the
SmolLM2 tokenizer, `<tool_call>` tokens and a Qwen-style ChatML template that renders tools.

A random model never calls a tool, so the model is briefly trained (seconds) on `MEMORISED`:
whatever the user asks with the `get_weather` tool offered, it answers with a hermes `<tool_call>`
for city "sf", and given the tool's result it answers "It is cold in sf.". Everything
else it says is noise, which is what the on-policy tests want (noise rarely re-tokenizes to the
same ids). Built once and cached under .cache/tiny-models/<hash of this file>.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

CHATML_TOOLS_TEMPLATE = r"""
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- if message.tool_calls %}{% for tc in message.tool_calls %}{% if not loop.first or message.content %}
{% endif %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}{% endif %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
""".strip()

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}


# The same tool as NeMo Gym's example_single_tool_call rows send it (after the server puts it in
# OpenAI's chat order): the tiny model must call it there too.
GYM_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": ""}},
                       "required": ["city"], "additionalProperties": False},
    },
}


def _tool_exchange(user: str, system: str | None) -> list[dict]:
    call = {"id": "call_0", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "sf"}}}
    head = [{"role": "system", "content": system}] if system else []
    return head + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": '{"city": "sf", "weather": "cold"}'},
        {"role": "assistant", "content": "It is cold in sf."},
    ]


# (conversation, tools): every assistant turn in these is learned verbatim. Varied questions with
# one answer teach "with this tool, first call it, then answer", whatever the user asks.
_QUESTIONS = ["what's it like in sf?", "going out in sf tn", "humidity in sf", "What is the weather?",
              "should I bring a jacket", "hello"]
_SYSTEM = "You are a helpful personal assistant that aims to be helpful and reduce any pain points the user has."
MEMORISED: list[tuple[list[dict], list[dict] | None]] = [
    # each tool rendering on a third of them: enough to learn it, cheap to train
    (_tool_exchange(q, _SYSTEM if i % 2 else None), [[WEATHER_TOOL], [GYM_WEATHER_TOOL], None][i % 3])
    for i, q in enumerate(_QUESTIONS)
]

# hashed at import: a process keeps building what its own code describes, even if the file changes
_SOURCE_KEY = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
CACHE = Path(os.environ.get("GRPO_CACHE_DIR", Path(__file__).resolve().parent.parent / ".cache")) / "tiny-models"


def tiny_model_dir() -> str:
    """Path of the cached tiny model folder, building it on first use."""
    out = CACHE / f"qwen2-tiny-{_SOURCE_KEY}"
    if not (out / "model.safetensors").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _build(out)
    return str(out)


def _assistant_spans(tok, messages: list[dict], tools) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a mask over each assistant turn's own ids.

    Rendered piece by piece exactly as the server renders prompts: each assistant turn follows
    the generation prompt, so the model learns to answer right after `<|im_start|>assistant`.
    """
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # the text covered so far

    def add(text: str, learn: int) -> None:
        new = tok.encode(text, add_special_tokens=False)
        ids.extend(new)
        mask.extend([learn] * len(new))

    for i, m in enumerate(messages):
        upto = tok.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False)
        if m["role"] == "assistant":
            prompt = tok.apply_chat_template(messages[:i], tools=tools, tokenize=False, add_generation_prompt=True)
            add(prompt[len(done):], 0)
            turn = upto[len(prompt):]
            end = turn.rindex("<|im_end|>") + len("<|im_end|>")
            add(turn[:end], 1)  # learn up to and including <|im_end|>, not the glue after it
            add(turn[end:], 0)
        else:
            add(upto[len(done):], 0)
        done = upto
    return ids, mask


def _build(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from engine.models import DEFAULT_MODEL, resolve_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    tok.chat_template = CHATML_TOOLS_TEMPLATE
    vocab = len(tok)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        rope_theta=10000.0, dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    seqs = [_assistant_spans(tok, conv, tools) for conv, tools in MEMORISED]
    width = max(len(ids) for ids, _ in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    x = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in seqs])
    attn = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in seqs])
    labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)] + [-100] * (width - len(ids))
                           for ids, mask in seqs])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    target = (labels != -100)[:, 1:]
    want = labels[:, 1:].clamp(min=0)
    for step in range(400):  # typically 100-200 steps
        res = model(input_ids=x, attention_mask=attn, labels=labels)
        res.loss.backward()
        opt.step()
        opt.zero_grad()
        # done when greedy decoding reproduces every learned turn (argmax under teacher forcing)
        # with a margin of one nat, so the engine's own kernels pick the same tokens
        with torch.no_grad():
            logits = res.logits[:, :-1]
            right = logits.gather(-1, want[..., None]).squeeze(-1)
            rival = logits.scatter(-1, want[..., None], float("-inf")).max(-1).values
            margin = (right - rival)[target].min().item()
        if step % 20 == 0:
            print(f"[tiny model] step {step} loss {res.loss.item():.4f} margin {margin:.2f}", flush=True)
        if margin > 1.0:
            break
    # a private temp folder: two test processes may build at once; the first rename wins
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + "."))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(tiny_model_dir())
