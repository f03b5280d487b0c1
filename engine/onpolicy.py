"""On-policy token-id correction.

The policy server receives text, not ids. Re-tokenizing an earlier assistant turn can split or
merge tokens differently from what the model sampled, and the chat template can re-render earlier
turns differently. Training would then see ids the model never produced. So when a request
carries the ids of its previous call (`prompt_token_ids + generation_token_ids`), the new prompt
is built as that exact prefix followed by whatever the template adds after the last assistant
turn (end-of-turn token onward).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


class ContiguityError(ValueError):
    """The template span gives no end-of-turn token to splice the prefix onto."""


def correct_prompt_ids(
    prefix: Sequence[int],
    template_ids: Sequence[int],
    template_prefix_ids: Sequence[int],
    end_of_turn_id: int,
) -> list[int]:
    """Return the prompt ids for a new call that start exactly with `prefix`.

    `template_ids` is the full re-rendered prompt; `template_prefix_ids` is the rendering of the
    messages up to and including the turn `prefix` stands for (the last assistant turn). If that
    span holds k end-of-turn tokens, the k-th end-of-turn token of the full render closes the same
    turn: from there on come the template's own glue (new user/tool turns, generation prompt).

    Counting, not measuring: a template may render earlier turns differently once a later message
    follows (Qwen3 drops `<think>` from assistant turns before the last user message), so the span's
    length says nothing about where its turn ends in the full render; the number of turns it closes
    is the same in both.

    >>> correct_prompt_ids([100, 2], [9, 2, 9, 2, 77, 88], [9, 2, 9, 2], 2)
    [100, 2, 77, 88]
    """
    if not prefix:
        return list(template_ids)
    k = sum(1 for t in template_prefix_ids if t == end_of_turn_id)
    if k == 0:
        raise ContiguityError(
            f"no end-of-turn token {end_of_turn_id} in the {len(template_prefix_ids)} ids rendered up to the last "
            "assistant turn: cannot locate where that turn ends")
    ends = [i for i, t in enumerate(template_ids) if t == end_of_turn_id]
    if len(ends) < k:
        raise ContiguityError(
            f"the full render closes {len(ends)} turns but the messages up to the last assistant turn close {k}: "
            "the template drops a turn, so the turn the prefix stands for cannot be located")
    cut = ends[k - 1]
    # A turn that stopped on end-of-turn keeps its sampled token and drops the template's copy; a
    # turn cut by max_tokens keeps all its ids and takes the end-of-turn from the template.
    base = list(prefix[:-1]) if prefix[-1] == end_of_turn_id else list(prefix)
    return base + list(template_ids[cut:])


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the chat template closes an assistant turn with.

    Found by rendering a one-exchange conversation and taking the first special token after the
    assistant's text; falls back to eos when the template closes turns with plain text.
    """
    marker = "XyZzY"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
        tokenize=False,
    )
    tail = text[text.rindex(marker) + len(marker):]
    special = set(tokenizer.all_special_ids) | set(
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    )
    for tid in tokenizer.encode(tail, add_special_tokens=False):
        if tid in special:
            return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("chat template closes turns with no special token and there is no eos")
    return tokenizer.eos_token_id
