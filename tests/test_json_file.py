"""The JSON files a user points the tools at (a checkpoint's config.json, tokenizer_config.json)
are read by one rule: a missing file says what was looked for, a bad one names the file and is
the reader's own error, never a traceback from json."""
from __future__ import annotations

import shutil

import pytest

from dllama import dl_tokenizer
from dllama.convert import ConvertError, load_hf_config
from dllama.testing import qwen3_tokenizer_dir
from dllama.tokenizer import Tokenizer

BAD = {"a list": "[1, 2]", "bad JSON": "{\"a\": ", "not UTF-8": b"\xff\xfe{}"}


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("content", BAD.values(), ids=BAD.keys())
def test_a_bad_config_json_is_a_convert_error_naming_it(tmp_path, content):
    write(tmp_path / "config.json", content)
    with pytest.raises(ConvertError, match="config.json: (not a JSON object|cannot read)"):
        load_hf_config(tmp_path)


def test_a_missing_config_json_asks_for_a_model_directory(tmp_path):
    with pytest.raises(ConvertError, match="no config.json .is this a Hugging Face model directory"):
        load_hf_config(tmp_path)


@pytest.mark.parametrize("content", BAD.values(), ids=BAD.keys())
def test_a_bad_tokenizer_config_fails_both_tokenizer_readers_naming_it(tmp_path, content):
    shutil.copytree(qwen3_tokenizer_dir(), tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    write(tmp_path / "tokenizer_config.json", content)
    with pytest.raises(ValueError, match="tokenizer_config.json: (not a JSON object|cannot read)"):
        Tokenizer.load(tmp_path)
    with pytest.raises(dl_tokenizer.TokenizerFileError, match="tokenizer_config.json: (not a JSON object|cannot read)"):
        dl_tokenizer.from_hf_dir(tmp_path)


def test_a_missing_tokenizer_config_is_named_by_the_converter(tmp_path):
    shutil.copytree(qwen3_tokenizer_dir(), tmp_path, dirs_exist_ok=True)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(dl_tokenizer.TokenizerFileError, match="no tokenizer_config.json"):
        dl_tokenizer.from_hf_dir(tmp_path)
