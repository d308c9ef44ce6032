"""Distributed Llama's .t tokenizer files with the real Qwen3 tokenizer: `dllama convert-tokenizer`
writes what its converter writes, and a .t file read back gives the Hugging Face tokenizer's ids,
specials, BOS/EOS and chat template."""
from __future__ import annotations

import json
import shutil
import struct

import pytest

from dllama import dl_tokenizer
from dllama.cli import main
from dllama.testing import TOKENIZER_FILES, qwen3_tokenizer_dir
from dllama.testing.checkpoint import QWEN3_BOS, QWEN3_EOS
from dllama.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! 안녕하세요, 반갑습니다. 오늘 날씨가 좋네요.",
    "def main():\n    print(f\"{x!r:>10}\")  # comment\n\treturn [i ** 2 for i in range(10)]\n",
    "🤖👍🏽🇰🇷 emoji, 👨‍👩‍👧‍👦 family; ünïcödé 日本語のテキスト ελληνικά Ω≈ç√",
    "   leading spaces\t\ttabs\r\n\n\n1234567890 3.14159 1e-10 $100,000",
    "e\u0301 (decomposed é) and Å vs Å",  # NFC in Qwen's normalizer
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nok<|im_end|>",
    "<tool_call>{\"name\": \"f\"}</tool_call><|endoftext|><|fim_prefix|>x<|fim_suffix|>",
    "I'm sure they'll say: \"it's DON'T, not don'T\"... ¿¡Qué!? — «ok»",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "안녕? What is 2+2 🤔"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3-tok")
    for f in TOKENIZER_FILES:
        shutil.copyfile(qwen3_tokenizer_dir() / f, d / f)
    (d / "config.json").write_text(json.dumps({"bos_token_id": QWEN3_BOS, "eos_token_id": QWEN3_EOS}))
    return d


@pytest.fixture(scope="module")
def t_file(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "dllama_tokenizer_qwen3.t"
    assert main(["convert-tokenizer", str(hf_dir), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def both(hf_dir, t_file, tmp_path_factory):
    """(the Hugging Face tokenizer, the one read from the .t file), the .t rebuilt into an empty cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DLLAMA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    try:
        yield Tokenizer.load(hf_dir), Tokenizer.load(t_file)
    finally:
        mp.undo()


@pytest.mark.slow
def test_convert_tokenizer_writes_what_distributed_llama_writes(hf_dir, t_file):
    dl_converter = pytest.importorskip("dl_converter")
    assert t_file.read_bytes() == dl_converter.tokenizer_file(hf_dir)


def test_the_file_holds_vocabulary_bos_eos_and_template(t_file, hf_dir):
    tf = dl_tokenizer.TokenizerFile.read(t_file)
    assert len(tf.tokens) == 151669 and tf.bos_id == QWEN3_BOS and tf.eos_ids == [QWEN3_EOS]
    assert tf.add_bos is False and tf.tokens[9707] == b"Hello" and tf.tokens[1879] == b" world"
    assert tf.chat_template == json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_the_hugging_face_tokenizer(both, text):
    hf, dl = both
    for special in (True, False):
        ids = hf.encode(text, add_special_tokens=special)
        assert dl.encode(text, add_special_tokens=special) == ids
    assert dl.decode(ids) == hf.decode(ids)
    assert dl.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_every_special_and_added_token(both):
    hf, dl = both
    assert dl.vocab_size == hf.vocab_size == 151669
    for i in range(QWEN3_BOS, hf.vocab_size):
        token = hf.id_to_token(i)
        assert dl.id_to_token(i) == token and dl.encode(token, add_special_tokens=False) == [i], token
        assert dl.decode([i], skip_special_tokens=True) == hf.decode([i], skip_special_tokens=True), token
    assert dl.eos_ids == hf.eos_ids and dl.add_bos == hf.add_bos is False


@pytest.mark.parametrize("thinking", [None, False, True])
def test_the_chat_template_renders_as_tokenizer_config_s(both, thinking):
    hf, dl = both
    kw = {"enable_thinking": thinking} if thinking is not None else {}
    for n in (2, 4):
        want = hf.apply_chat_template(MESSAGES[:n], add_generation_prompt=True, **kw)
        assert dl.apply_chat_template(MESSAGES[:n], add_generation_prompt=True, **kw) == want
        assert dl.encode(want, add_special_tokens=False) == hf.encode(want, add_special_tokens=False)


def test_a_second_load_reuses_the_cached_tokenizer(t_file, tmp_path, monkeypatch, both):
    monkeypatch.setenv("DLLAMA_CACHE_DIR", str(tmp_path))
    tk, _ = dl_tokenizer.load(t_file)
    cached = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(cached) == 1
    cached[0].write_text("{ damaged")  # a damaged entry is rebuilt, not trusted
    again, _ = dl_tokenizer.load(t_file)
    assert again.encode(TEXTS[0]).ids == tk.encode(TEXTS[0]).ids == both[0].encode(TEXTS[0], False)


def _damage(data: bytes, kind: str) -> bytes:
    if kind == "magic":
        return b"\x00\x00\x00\x00" + data[4:]
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "trailing":
        return data + b"x"
    key = {"vocab": 1, "template": 7}[kind]
    size = struct.unpack_from("<i", data, 4)[0]
    for at in range(8, size, 8):
        if struct.unpack_from("<i", data, at)[0] == key:
            return data[: at + 4] + struct.pack("<i", 1 << 30) + data[at + 8 :]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,words", [
    ("magic", "not a Distributed Llama .t tokenizer"), ("truncated", "truncated"), ("trailing", "bytes after the last"),
    ("vocab", "vocab size 1073741824 is out of range"), ("template", "chat template length 1073741824 is out"),
])
def test_a_damaged_file_is_a_clear_error(t_file, tmp_path, kind, words):
    bad = tmp_path / "bad.t"
    bad.write_bytes(_damage(t_file.read_bytes(), kind))
    with pytest.raises(ValueError, match=words) as e:
        Tokenizer.load(bad)
    assert str(bad) in str(e.value)


def test_convert_tokenizer_refuses_a_directory_without_bos_and_eos(hf_dir, tmp_path, capsys):
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    (d / "config.json").write_text("{}")
    out = tmp_path / "x.t"
    assert main(["convert-tokenizer", str(d), "-o", str(out)]) == 1
    assert "no bos_token_id / eos_token_id" in capsys.readouterr().err and not out.exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_llama3_style_tokenizer_round_trips(tmp_path):
    """The Llama 3 family (its split pattern, ignore_merges, BOS added): a byte-level BPE trained
    here in that shape goes through convert-tokenizer and back to the same ids."""
    from tokenizers import Regex, decoders, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers.models import BPE

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = HfTokenizer(BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(dl_tokenizer.LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    tk.add_special_tokens(specials)
    bos = tk.token_to_id(specials[0])
    tk.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)])
    d = tmp_path / "llama"
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "bos_token": specials[0], "eos_token": specials[4]}))
    (d / "config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [bos + 1, bos + 4]}))
    out = tmp_path / "llama.t"
    assert main(["convert-tokenizer", str(d), "-o", str(out)]) == 0
    hf, dl = Tokenizer.load(d), Tokenizer.load(out)
    assert dl.bos_id == hf.bos_id == bos and dl.add_bos and hf.add_bos
    for text in [*TEXTS, "1234567 12 1", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        assert dl.encode(text) == hf.encode(text) and dl.encode(text)[0] == bos, text
        assert dl.decode(hf.encode(text)) == hf.decode(hf.encode(text))
