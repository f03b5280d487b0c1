"""On-policy token-id correction: the new prompt begins with exactly the ids seen and sampled."""

import pytest
from transformers import AutoTokenizer

from engine.chat import ChatRenderer
from engine.models import DEFAULT_MODEL, resolve_model
from engine.onpolicy import ContiguityError, correct_prompt_ids, end_of_turn_id
from engine.protocol import ChatMessage


def test_prefix_ending_in_eot_replaces_the_templates_copy():
    assert correct_prompt_ids([100, 2], [9, 2, 9, 2, 77, 88], [9, 2, 9, 2], 2) == [100, 2, 77, 88]


def test_prefix_cut_by_max_tokens_keeps_all_ids_and_takes_eot_from_template():
    assert correct_prompt_ids([100, 101], [9, 2, 9, 2, 77, 88], [9, 2, 9, 2], 2) == [100, 101, 2, 77, 88]


def test_empty_prefix_returns_template_unchanged():
    assert correct_prompt_ids([], [9, 2, 77], [9, 2], 2) == [9, 2, 77]


def test_no_eot_in_template_span_is_an_error():
    with pytest.raises(ContiguityError):
        correct_prompt_ids([100, 2], [9, 9, 9, 2, 77], [9, 9, 9], 2)


def test_only_eots_inside_the_prefix_span_count():
    # the eot at index 4 lies after the span and must not be used
    assert correct_prompt_ids([5, 2], [9, 2, 9, 9, 2, 77], [9, 2, 9, 9], 2) == [5, 2, 9, 9, 2, 77]


@pytest.fixture(scope="module")
def smol():
    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))


def test_end_of_turn_is_read_from_the_chat_template(smol):
    assert end_of_turn_id(smol) == smol.convert_tokens_to_ids("<|im_end|>") == 2


def test_end_of_turn_differs_from_eos_when_the_template_says_so(smol, tmp_path):
    smol.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.eos_token = "<|endoftext|>"
    assert tok.eos_token_id != 2
    assert end_of_turn_id(tok) == 2


def test_renderer_keeps_sampled_ids_that_retokenize_differently(smol):
    r = ChatRenderer(smol, tool_parser=None)
    first = [ChatMessage(role="user", content="Say something")]
    p1 = r.prompt_ids(first)
    # " Skinny" sampled piece by piece; its text re-tokenizes to fewer, other ids
    sampled = [i for piece in (" S", "k", "in", "ny") for i in smol.encode(piece, add_special_tokens=False)] + [2]
    text = smol.decode(sampled[:-1])
    assert smol.encode(text, add_special_tokens=False) != sampled[:-1]
    second = first + [
        ChatMessage(role="assistant", content=text, prompt_token_ids=p1, generation_token_ids=sampled),
        ChatMessage(role="user", content="Again"),
    ]
    p2 = r.prompt_ids(second)
    assert p2[: len(p1) + len(sampled)] == p1 + sampled
    assert smol.decode(p2[len(p1) + len(sampled):]) == "\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"


# ---- NeMo RL's splice cases (its tests of `replace_prefix_tokens`), in our words ----------------

def test_turn_two_keeps_the_sampled_ids_where_the_template_retokenized_them():
    # turn 1 sampled " 4" as [220, 17] then eot; the template re-renders it as one id 1001
    prefix = [11, 12, 13, 40, 41, 220, 17, 2]
    assert correct_prompt_ids(prefix, [11, 12, 13, 40, 41, 1001, 2, 21, 22, 40, 41],
                              [11, 12, 13, 40, 41, 1001, 2], 2) == [11, 12, 13, 40, 41, 220, 17, 2, 21, 22, 40, 41]


def test_a_full_render_missing_the_spans_turn_end_is_an_error_naming_the_count():
    with pytest.raises(ContiguityError, match="closes 0 turns but .* close 1"):
        correct_prompt_ids([100, 2], [9, 77], [9, 2], 2)


def test_a_shorter_rerender_of_the_assistant_turn_cuts_at_its_end_not_at_the_next_users():
    # Qwen3's shape: the assistant turn (88 88 88 56) re-renders as (56) once a user turn follows,
    # so the span's length reaches past the assistant's eot into the new user turn (70 71 2)
    result = correct_prompt_ids([11, 12, 99, 99, 99, 55, 2], [11, 12, 56, 2, 70, 71, 2, 40, 41],
                                [11, 12, 88, 88, 88, 56, 2], 2)
    assert result == [11, 12, 99, 99, 99, 55, 2, 70, 71, 2, 40, 41]


QWEN3_STYLE_TEMPLATE = (
    # like Qwen3: reasoning is dropped from assistant turns that come before the last user message
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m.content -%}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def test_reasoning_dropped_from_history_keeps_the_sampled_ids_and_the_new_user_turn(smol, tmp_path):
    smol.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.chat_template = QWEN3_STYLE_TEMPLATE
    r = ChatRenderer(tok, tool_parser=None)
    first = [ChatMessage(role="user", content="What is 2+2?")]
    p1 = r.prompt_ids(first)
    reply = ("<think>\nTwo and two make four; adding small numbers like these is easy, so I can answer at once "
             "without any further working.\n</think>\n\nThe answer is 4.")
    sampled = tok.encode(reply, add_special_tokens=False) + [2]
    second = first + [
        ChatMessage(role="assistant", content=reply, prompt_token_ids=p1, generation_token_ids=sampled),
        ChatMessage(role="user", content="And 3+3?"),
    ]
    p2 = r.prompt_ids(second)
    assert p2[: len(p1) + len(sampled)] == p1 + sampled
    assert tok.decode(p2[len(p1) + len(sampled):]) == "\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"


def test_required_prefix_without_an_assistant_message_splices_against_the_whole_conversation(smol):
    r = ChatRenderer(smol, tool_parser=None)
    messages = [ChatMessage(role="user", content="Say something")]
    rendered = r.render(messages, None, False)          # ... "Say something<|im_end|>\n"
    # the caller's ids for the same conversation, " something" split in two pieces
    piece_ids = [i for piece in (" some", "thing") for i in smol.encode(piece, add_special_tokens=False)]
    said = smol.encode(" something", add_special_tokens=False)
    at = next(i for i in range(len(rendered)) if rendered[i:i + len(said)] == said)
    prefix = rendered[:at] + piece_ids + [2]
    ids = r.prompt_ids(messages, required_prefix=prefix)
    assert ids[: len(prefix)] == prefix
    assert smol.decode(ids[len(prefix):]) == "\n<|im_start|>assistant\n"
