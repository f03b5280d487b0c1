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
    template_prefix_len: int,
    end_of_turn_id: int,
) -> list[int]:
    """Return the prompt ids for a new call that start exactly with `prefix`.

    `template_ids` is the full re-rendered prompt; its first `template_prefix_len` ids are the
    re-rendering of the messages up to and including the last assistant turn (which `prefix`
    stands for). The last end-of-turn token inside that span marks where the template's own glue
    (end-of-turn, new user/tool turns, generation prompt) begins.

    >>> correct_prompt_ids([100, 2], [9, 2, 9, 2, 77, 88], 4, 2)
    [100, 2, 77, 88]
    """
    if not prefix:
        return list(template_ids)
    span = template_ids[:template_prefix_len]
    try:
        cut = len(span) - 1 - list(reversed(span)).index(end_of_turn_id)
    except ValueError:
        raise ContiguityError(
            f"no end-of-turn token {end_of_turn_id} in the first {template_prefix_len} template ids"
        ) from None
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
