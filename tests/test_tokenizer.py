"""Tokenizer: ids and text identical to the `tokenizers` library, streaming, special ids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from dllama.tokenizer import Tokenizer

from dllama.testing import qwen3_tokenizer_dir as tokenizer_dir

TEXTS = [
    "Hello, world!",
    "안녕하세요, 세계! 오늘 날씨가 정말 좋네요. The weather is nice today.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "라즈베리 파이 클러스터에서 Qwen3를 실행합니다 🚀🤖 with 4 nodes.",
    "emoji: 👩‍👩‍👧‍👦 🇰🇷 ❤️ 😀😃😄",
    "spaces:   three\t\ttabs\n\n\nnewlines    trailing   ",
    "<|im_start|>user\n질문이 있어요<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "mixed 한국어 and English, 숫자 12345 and symbols ~!@#$%^&*()_+{}|:\"<>?",
    "",
    " ",
    "<|endoftext|>",
]




@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(tokenizer_dir())


@pytest.fixture(scope="module")
def reference() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_tokenizers(tok: Tokenizer, reference: tokenizers.Tokenizer, text: str) -> None:
    assert tok.encode(text) == reference.encode(text, add_special_tokens=True).ids
    assert tok.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") == 151644
    assert ids[-1] == tok.token_to_id("<|im_end|>") == 151645
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_qwen3_special_ids(tok: Tokenizer) -> None:
    assert tok.bos_id is None
    assert tok.eos_ids == {151643, 151645}  # <|endoftext|>, <|im_end|>
    assert tok.vocab_size == 151669
    assert tok.id_to_token(151645) == "<|im_end|>"
    assert tok.encode("hi")[0] != tok.token_to_id("<|endoftext|>")  # no BOS for Qwen3


def chunks_of(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_joins_to_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = chunks_of(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stream_decoder_holds_back_partial_characters(tok: Tokenizer) -> None:
    # one emoji split over several byte-level tokens: nothing is printed until it is whole
    ids = tok.encode(" 🤖")
    assert len(ids) == 3
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids[:-1]] == ["", ""]
    assert decoder.push(ids[-1]) == " 🤖"
    assert decoder.flush() == ""


def test_stream_decoder_flushes_an_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode("가 🤖")
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids[:-1]]
    assert "".join(pieces) == "가"
    assert tok.decode(ids[:-1]).endswith("\ufffd")
    assert decoder.flush() == tok.decode(ids[:-1])[1:]  # the broken bytes, as decode shows them
    assert decoder.text == tok.decode(ids[:-1])


def test_stream_decoder_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\n답변 🙂<|im_end|>")
    decoder = tok.stream_decoder(skip_special_tokens=True)
    text = decoder.push_many(ids) + decoder.flush()
    assert text == tok.decode(ids, skip_special_tokens=True) == "assistant\n답변 🙂"


def test_load_accepts_file_dir_and_config(tmp_path: Path) -> None:
    source = tokenizer_dir()
    for path in (source, source / "tokenizer.json", source / "tokenizer_config.json"):
        tok = Tokenizer.load(path)
        assert tok.eos_ids == {151643, 151645}
        assert tok.chat_template is not None
    # a bare tokenizer.json: no config, no template
    (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    bare = Tokenizer.load(tmp_path / "tokenizer.json")
    assert bare.chat_template is None
    assert bare.bos_id is None
    assert bare.eos_ids == {151643, 151645}  # known markers found in the vocabulary


def test_generation_config_adds_eos_ids(tmp_path: Path) -> None:
    source = tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151643, 151644]}))
    assert Tokenizer.load(tmp_path).eos_ids == {151643, 151644, 151645}


def test_llama3_style_bos(tmp_path: Path) -> None:
    # the Qwen3 vocabulary dressed as Llama 3: a post-processor adding BOS, a config naming it
    source = tokenizer_dir()
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    bos = "<|endoftext|>"
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [151643], "tokens": [bos]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = Tokenizer.load(tmp_path)
    assert tok.bos_id == 151643
    assert tok.encode("hi") == [151643, *tok.encode("hi", add_special_tokens=False)]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "add_bos_token": False}))
    tok = Tokenizer.load(tmp_path)
    assert tok.bos_id == 151643
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


def test_missing_and_bad_files_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "model.t"
    bad.write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match="Distributed Llama .t tokenizer"):
        Tokenizer.load(bad)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        Tokenizer.load(broken)
