"""Chat template: our rendering equals transformers' apply_chat_template, character for character."""
from __future__ import annotations

from pathlib import Path

import pytest

from dllama.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

from dllama.testing import qwen3_tokenizer_dir as tokenizer_dir




@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.load(tokenizer_dir())


@pytest.fixture(scope="module")
def theirs():
    with pytest.MonkeyPatch.context() as mp:  # the hub is out of reach: load from the directory only
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        transformers = pytest.importorskip("transformers")
        return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)


SYSTEM = {"role": "system", "content": "You are a helpful assistant. 한국어로 답하세요."}
TURNS = [
    {"role": "user", "content": "What is a Raspberry Pi cluster?"},
    {"role": "assistant", "content": "Several small boards networked together."},
    {"role": "user", "content": "라즈베리 파이 5는 몇 개의 코어가 있나요? 🤔"},
]
THINKING_TURNS = [
    {"role": "user", "content": "2 + 2?"},
    {"role": "assistant", "content": "<think>\nSimple arithmetic.\n</think>\n\n4"},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "<think>\n4 * 3 = 12\n</think>\n\n12"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city (날씨)",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "e.g. 서울"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Seoul?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "서울"}}}],
    },
    {"role": "tool", "content": '{"temp_c": 21}'},
]

CONVERSATIONS = {
    "one user turn": [TURNS[0]],
    "system and several turns": [SYSTEM, *TURNS],
    "assistant turns with thinking": [SYSTEM, *THINKING_TURNS, {"role": "user", "content": "Thanks"}],
    "thinking in the last assistant turn": [*THINKING_TURNS],
    "reasoning_content field": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
    ],
    "tool call and response": [SYSTEM, *TOOL_TURNS],
}


@pytest.mark.parametrize("enable_thinking", [None, True, False], ids=["unset", "thinking", "no-thinking"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_matches_transformers(ours: Tokenizer, theirs, name: str, enable_thinking: bool | None) -> None:
    messages = CONVERSATIONS[name]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for add_generation_prompt in (True, False):
        expected = theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        assert got == expected


@pytest.mark.parametrize("enable_thinking", [None, False])
def test_tools_match_transformers(ours: Tokenizer, theirs, enable_thinking: bool | None) -> None:
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for messages in ([SYSTEM, TURNS[0]], [TURNS[0]], [SYSTEM, *TOOL_TURNS]):
        expected = theirs.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True, **kwargs)
        assert ours.apply_chat_template(messages, tools=TOOLS, enable_thinking=enable_thinking) == expected
        assert "서울" in expected or "날씨" in expected  # tojson keeps non-ASCII as it is


def test_generation_prompt_endings(ours: Tokenizer) -> None:
    assert ours.apply_chat_template([TURNS[0]]).endswith("<|im_start|>assistant\n")
    assert ours.apply_chat_template([TURNS[0]], enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


# A template that reads list-of-parts content, bos/eos variables, tojson options, loop controls,
# strftime_now and {% generation %}: rendered by both sides with the same template.
PARTS_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}"
    "{% if m.content is string %}{{ m.role }}: {{ m.content }}\n"
    "{% else %}{{ m.role }}:{% for part in m.content %}{% if part.type != 'text' %}{% continue %}{% endif %}"
    " [{{ part.text }}]{% endfor %}\n{% endif %}"
    "{% endfor %}"
    "{% if tools %}{{ tools | tojson(indent=2) }}\n{% endif %}"
    "{% if strftime_now('%Y') | length != 4 %}{{ raise_exception('bad year') }}{% endif %}"
    "{% if add_generation_prompt %}{% generation %}assistant:{% endgeneration %}{% endif %}{{ eos_token }}"
)


def test_list_of_parts_and_template_features_match_transformers(ours: Tokenizer, theirs) -> None:
    messages = [
        {"role": "system", "content": "plain"},
        {"role": "user", "content": [{"type": "text", "text": "첫 부분"}, {"type": "image"}, {"type": "text", "text": "second"}]},
    ]
    expected = theirs.apply_chat_template(
        messages, tools=TOOLS, chat_template=PARTS_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    got = ours.apply_chat_template(messages, tools=TOOLS, chat_template=PARTS_TEMPLATE)
    assert got == expected
    assert "user: [첫 부분] [second]" in got  # the image part skipped by {% continue %}


def test_list_of_parts_passes_through_to_the_template(ours: Tokenizer) -> None:
    # the Qwen3 template concatenates content as a string: list content is the template's error
    # (transformers fails the same way), reported as a ValueError
    with pytest.raises(ValueError, match="chat template error"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_raise_exception_becomes_value_error(ours: Tokenizer) -> None:
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok"
    with pytest.raises(ValueError, match="first message must be from the user"):
        ours.apply_chat_template([SYSTEM], chat_template=template)
    assert ours.apply_chat_template([TURNS[0]], chat_template=template) == "ok"


def test_template_syntax_error_is_value_error(ours: Tokenizer) -> None:
    with pytest.raises(ValueError, match="syntax error"):
        ours.apply_chat_template([TURNS[0]], chat_template="{% if %}")


def test_sandbox_refuses_internals(ours: Tokenizer) -> None:
    with pytest.raises(ValueError, match="chat template error"):
        ours.apply_chat_template([TURNS[0]], chat_template="{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(ValueError):
        ours.apply_chat_template([TURNS[0]], chat_template="{% set ns = namespace(_x=1) %}")


def test_no_template_and_empty_conversation(ours: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir() / "tokenizer.json").read_bytes())
    bare = Tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([TURNS[0]])
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])


def test_chat_template_file_beside_the_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir() / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert Tokenizer.load(tmp_path).apply_chat_template([TURNS[0]]) == f"<user>{TURNS[0]['content']}"


def test_caller_messages_are_not_modified(ours: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi", "name": None}, {"role": "assistant", "content": "x", "reasoning": "r"}]
    snapshot = [dict(m) for m in messages]
    ours.apply_chat_template(messages)
    assert messages == snapshot
