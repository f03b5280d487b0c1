"""On-policy token-id correction: the new prompt begins with exactly the ids seen and sampled."""

import pytest
from transformers import AutoTokenizer

from engine.chat import ChatRenderer
from engine.models import DEFAULT_MODEL, resolve_model
from engine.onpolicy import ContiguityError, correct_prompt_ids, end_of_turn_id
from engine.protocol import ChatMessage


def test_prefix_ending_in_eot_replaces_the_templates_copy():
    assert correct_prompt_ids([100, 2], [9, 2, 9, 2, 77, 88], 4, 2) == [100, 2, 77, 88]


def test_prefix_cut_by_max_tokens_keeps_all_ids_and_takes_eot_from_template():
    assert correct_prompt_ids([100, 101], [9, 2, 9, 2, 77, 88], 4, 2) == [100, 101, 2, 77, 88]


def test_empty_prefix_returns_template_unchanged():
    assert correct_prompt_ids([], [9, 2, 77], 2, 2) == [9, 2, 77]


def test_no_eot_in_template_span_is_an_error():
    with pytest.raises(ContiguityError):
        correct_prompt_ids([100, 2], [9, 9, 9, 2, 77], 3, 2)


def test_only_eots_inside_the_prefix_span_count():
    # the eot at index 4 lies after the span and must not be used
    assert correct_prompt_ids([5, 2], [9, 2, 9, 9, 2, 77], 4, 2) == [5, 2, 9, 9, 2, 77]


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
