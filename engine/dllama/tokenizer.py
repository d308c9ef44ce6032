"""The model's tokenizer and chat template: a Hugging Face tokenizer.json read with `tokenizers`,
its tokenizer_config.json (special tokens, chat template) and an optional generation_config.json.

The chat template is rendered the way `transformers` renders it (same jinja2 sandbox, options,
filters and globals), so a prompt built here is byte for byte the prompt the model was trained on.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .json_file import read_json_object

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where newer checkpoints keep the template

# End-of-turn and end-of-text markers of the families we run: Qwen3 (ChatML) and Llama 3.
KNOWN_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")
# The named special tokens transformers hands to every chat template.
TEMPLATE_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
# Names a message's reasoning arrives under; transformers copies it to the first two.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """Text <-> token ids, special ids, and the chat template of one model."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tk = tokenizer
        self.config = dict(config or {})
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

        # special token strings, as the chat template sees them
        self.special_tokens: dict[str, str] = {}
        for name in TEMPLATE_TOKEN_NAMES:
            value = _token_content(self.config.get(name))
            if value is not None:
                self.special_tokens[name] = value

        # bos: the config's bos_token, else whatever tokenizer.json's post-processor prepends
        plain = tokenizer.encode("a", add_special_tokens=False).ids
        special = tokenizer.encode("a", add_special_tokens=True).ids
        prepended = special[: len(special) - len(plain)] if special[-len(plain):] == plain else []
        self._post_processor_adds_bos = len(prepended) == 1
        bos_token = self.special_tokens.get("bos_token")
        self.bos_id: int | None = tokenizer.token_to_id(bos_token) if bos_token else None
        if self.bos_id is None and "bos_token" not in self.config and self._post_processor_adds_bos:
            self.bos_id = prepended[0]
        add_bos = self.config.get("add_bos_token")
        self.add_bos: bool = add_bos if isinstance(add_bos, bool) else self._post_processor_adds_bos
        if self.bos_id is None:
            self.add_bos = False

        # eos: every id that ends a reply
        eos: set[int] = set()
        eos_token = self.special_tokens.get("eos_token")
        for token in (eos_token, *KNOWN_EOS_TOKENS):
            token_id = tokenizer.token_to_id(token) if token else None
            if token_id is not None:
                eos.add(token_id)
        gen_eos = (generation_config or {}).get("eos_token_id")
        for token_id in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(token_id, int) and 0 <= token_id < self.vocab_size:
                eos.add(token_id)
        self.eos_ids: set[int] = eos

        self.chat_template: str | None = chat_template if chat_template is not None else _config_template(self.config)

    # loading

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a tokenizer.json, its directory, the tokenizer_config.json beside it, or a
        Distributed Llama .t tokenizer file (dllama.dl_tokenizer)."""
        from . import dl_tokenizer

        path = Path(path)
        if path.is_dir() and not (path / TOKENIZER_FILE).is_file() and len(found := sorted(path.glob("*.t"))) == 1:
            path = found[0]  # a directory holding one .t tokenizer (as the model role installs one)
        if path.is_file() and (path.suffix == ".t" or dl_tokenizer.is_tokenizer_file(path)):
            tk, tf = dl_tokenizer.load(path)
            return cls(tk, tf.tokenizer_config(), {"eos_token_id": tf.eos_ids})
        if path.is_dir():
            directory, tokenizer_file = path, path / TOKENIZER_FILE
        elif path.name == CONFIG_FILE:
            directory, tokenizer_file = path.parent, path.parent / TOKENIZER_FILE
        else:
            directory, tokenizer_file = path.parent, path
        if not tokenizer_file.is_file():
            if not path.exists():
                raise FileNotFoundError(f"tokenizer not found: {path}")
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}")
        _refuse_dllama_tokenizer(tokenizer_file)
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises its own Exception type for bad files
            raise ValueError(f"cannot read {tokenizer_file}: {e}") from None
        config = _read_json(directory / CONFIG_FILE)
        generation_config = _read_json(directory / GENERATION_CONFIG_FILE)
        template = None
        template_file = directory / TEMPLATE_FILE
        if _config_template(config or {}) is None and template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        return cls(tokenizer, config, generation_config, template)

    # text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special tokens written in the text (e.g. <|im_start|>) become their ids.

        With add_special_tokens, a BOS id is prepended when the tokenizer says so (Llama 3: yes,
        Qwen3: no)."""
        if add_special_tokens and self.add_bos == self._post_processor_adds_bos:
            return self._tk.encode(text, add_special_tokens=True).ids
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # chat template

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for a conversation, rendered exactly as transformers renders it.

        messages are dicts with role and content (a string, or a list of parts passed to the
        template as they are). enable_thinking=None leaves the template's default. Extra keyword
        arguments become template variables."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template (no chat_template in tokenizer_config.json)")
        if not messages:
            raise ValueError("cannot render an empty conversation")
        chat = []
        for message in messages:
            if not isinstance(message, dict):
                raise ValueError(f"a chat message must be a dict with role and content, got {message!r}")
            chat.append(_alias_reasoning(_plain({k: v for k, v in message.items() if v is not None})))
        if tools is not None:
            tools = _plain(list(tools))
            if not all(isinstance(tool, dict) for tool in tools):
                raise ValueError("tools must be JSON schemas (dicts)")
        variables = {**self.special_tokens, **_plain(kwargs)}
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            return _compile(template).render(
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except (jinja2.TemplateError, TypeError) as e:
            raise ValueError(f"chat template error: {e}") from None


class StreamDecoder:
    """Turns tokens into printable text as they arrive.

    push(id) returns the new text (maybe ""), holding back bytes of a character that is not
    complete yet; flush() returns what is left. The pieces joined equal decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        self._prefix = 0  # decode window start: a token where the text is at a character boundary
        self._read = 0  # tokens already turned into returned text

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an unfinished character (or nothing visible yet): wait for more tokens
        piece = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(token_id) for token_id in ids)

    def flush(self) -> str:
        """The text still held back (an incomplete character is decoded with replacement)."""
        full = self._decode(self.ids)
        if full.startswith(self.text):
            piece = full[len(self.text) :]
        else:  # a decoder whose output is not prefix-stable: fall back to the window
            piece = self._decode(self.ids[self._prefix :])[len(self._decode(self.ids[self._prefix : self._read])) :]
        self.text += piece
        self._prefix = self._read = len(self.ids)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""


# helpers


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path) if path.is_file() else None


def _refuse_dllama_tokenizer(path: Path) -> None:
    """Distributed Llama's binary .t tokenizer is not JSON: say so instead of a parse error."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if not head.startswith(b"{"):
        hint = " (a Distributed Llama .t tokenizer?)" if path.suffix == ".t" else ""
        raise ValueError(
            f"{path} is not a Hugging Face tokenizer.json{hint}; pass the model's tokenizer.json or its directory"
        )


def _plain(value: Any) -> Any:
    """A copy of value made of plain JSON types, so the template cannot reach foreign objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # unlike jinja's own tojson: no HTML escaping, and the options templates use
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore attributes (no way into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")


class _GenerationTag(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: transformers marks assistant text with it; we render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """dict() for templates, without the rest of the type's attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # the environment transformers renders chat templates in
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template syntax error (line {e.lineno}): {e.message}") from None
