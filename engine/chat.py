"""Chat template rendering (with the on-policy fix) and tool-call parsing for one model.

Rendering uses the model's own Hugging Face chat template; tool calls are parsed by vLLM's tool
parsers (hermes `<tool_call>` JSON by default, what Qwen models emit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .onpolicy import correct_prompt_ids, end_of_turn_id
from .protocol import ChatMessage, FunctionCall, ToolCall


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


class ChatRenderer:
    """Turns chat messages into prompt ids and model text back into content + tool calls.

        renderer = ChatRenderer(engine.tokenizer, tool_parser="hermes")
        ids = renderer.prompt_ids(messages, tools)
    """

    def __init__(self, tokenizer: Any, tool_parser: str | None = "hermes") -> None:
        self.tokenizer = tokenizer
        self.end_of_turn_id = end_of_turn_id(tokenizer)
        self._tool_parser_cls = None
        if tool_parser:
            from vllm.tool_parsers import ToolParserManager

            self._tool_parser_cls = ToolParserManager.get_tool_parser(tool_parser)

    def render(self, messages: list[ChatMessage], tools: list[dict] | None, add_generation_prompt: bool,
               template_kwargs: dict[str, Any] | None = None) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [m.for_template() for m in messages],
            tools=[chat_tool(t) for t in tools] if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **(template_kwargs or {}),
        )
        # the template already wrote any BOS it wants
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: list[ChatMessage], tools: list[dict] | None = None,
                   template_kwargs: dict[str, Any] | None = None,
                   required_prefix: list[int] | None = None) -> list[int]:
        """Prompt ids that begin exactly with the ids the previous call saw and sampled."""
        full = self.render(messages, tools, True, template_kwargs)
        last = _last_with_ids(messages)
        if required_prefix:
            # Gym's extension: the caller states the ids the new prompt must begin with. They stand
            # for the conversation up to its last assistant turn or, with none, for all of it.
            prefix = list(required_prefix)
            last = last if last is not None else _last_assistant(messages)
            if last is None:
                last = len(messages) - 1
        elif last is None:
            return full
        else:
            m = messages[last]
            prefix = list(m.prompt_token_ids or []) + list(m.generation_token_ids or [])
        upto = self.render(messages[: last + 1], tools, False, template_kwargs)
        return correct_prompt_ids(prefix, full, upto, self.end_of_turn_id)

    def parse(self, text: str, tools: list[dict] | None, tool_choice: Any = None) -> ParsedOutput:
        if not tools or tool_choice == "none" or self._tool_parser_cls is None:
            return ParsedOutput(text, [])
        parser = self._tool_parser_cls(self.tokenizer)
        # hermes' extract_tool_calls reads only the text; the request argument is unused there
        info = parser.extract_tool_calls(text, request=None)
        if not info.tools_called:
            return ParsedOutput(text, [])
        calls = [ToolCall(function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
                 for c in info.tool_calls]
        return ParsedOutput(info.content or None, calls)


def chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool in OpenAI chat form with a fixed key order, as vLLM's server renders it.

    Templates print tools with `tojson`, which keeps key order, so the same tool sent
    function-first (as NeMo Gym does) or flat (Responses API style) would otherwise render
    differently from what the model saw in training.
    """
    fn = tool.get("function", tool)
    body = {k: fn[k] for k in ("name", "description", "parameters") if k in fn}
    return {"type": tool.get("type", "function"), "function": body}


def _last_with_ids(messages: list[ChatMessage]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.prompt_token_ids is not None and m.generation_token_ids is not None:
            return i
    return None


def _last_assistant(messages: list[ChatMessage]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "assistant"), None)
