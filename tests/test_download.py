"""`dllama download` against a hub served from a thread on 127.0.0.1 (never the real hosts): a small
real .m file in parts and a .t tokenizer, with Range requests, dropped connections, a server that
ignores Range, wrong checksums and files that do not match their header."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from dllama import download
from dllama.cli import main
from dllama.dl_tokenizer import TokenizerFile
from dllama.model_file import ModelFile
from local_hub import Hub, small_model_bytes, small_tokenizer_bytes

MULTI = "qwen3_14b_q40"  # two parts in Distributed Llama's list
SINGLE = "qwen3_0.6b_q40"


@pytest.fixture
def hub(tmp_path):
    h = Hub()
    h.model = small_model_bytes(tmp_path)
    h.tokenizer = small_tokenizer_bytes()
    h.add_model(MULTI, h.model, h.tokenizer)
    h.add_model(SINGLE, h.model, h.tokenizer)
    server, h.url = h.serve()
    yield h
    server.shutdown()
    server.server_close()


def run(hub, tmp_path, name, capsys, *extra):
    code = main(["download", name, "--dir", str(tmp_path / "models"), "--base-url", hub.url, "--no-progress", *extra])
    return code, capsys.readouterr()


def leftovers(tmp_path) -> list[Path]:
    return sorted(p for p in (tmp_path / "models").rglob("*") if p.name.endswith((".partial", ".partial.json", ".tmp")))


def test_list_names_distributed_llama_s_models(capsys):
    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("qwen3_30b_a3b_q40", "qwen3_8b_q40", "qwen3_0.6b_q40", "llama3_1_8b_instruct_q40",
                 "llama3_2_1b_instruct_q40"):
        assert name in out
    assert download.MODELS["qwen3_30b_a3b_q40"].parts[-1].endswith("_ae")  # 5 parts: aa..ae


def test_parts_are_joined_verified_and_the_command_printed(hub, tmp_path, capsys):
    code, out = run(hub, tmp_path, MULTI, capsys)
    assert code == 0, out.err
    model, tok = download.paths(tmp_path / "models", MULTI)
    assert model.read_bytes() == hub.model and tok.read_bytes() == hub.tokenizer
    assert f"dllama chat --model {model} --tokenizer {tok}" in out.out
    assert f"dllama inference --model {model} --tokenizer {tok}" in out.out
    assert not leftovers(tmp_path)
    with ModelFile.open(model) as mf:
        assert mf.config.vocab_size == 258
    assert TokenizerFile.read(tok).eos_ids == [257]
    # a second run finds both complete and fetches nothing
    hub.requests.clear()
    code, out = run(hub, tmp_path, MULTI, capsys)
    assert code == 0 and "already complete" in out.err
    assert not [p for p, _ in hub.requests if "/resolve/" in p]


def test_a_dropped_connection_resumes_with_a_range_request(hub, tmp_path, capsys):
    m = download.MODELS[MULTI]
    first = f"/{m.repo}/resolve/main/{m.parts[0]}"
    hub.drop_after[first] = 10_000
    code, out = run(hub, tmp_path, MULTI, capsys)
    assert code == 0, out.err
    assert (first, "bytes=10000-") in hub.requests and "resuming at byte 10000" in out.err
    assert download.paths(tmp_path / "models", MULTI)[0].read_bytes() == hub.model


def test_an_interrupted_download_resumes_in_a_later_run(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(download, "ATTEMPTS", 2)
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    m = download.MODELS[MULTI]
    second = f"/{m.repo}/resolve/main/{m.parts[1]}"
    hub.drop_after[second] = 5000
    hub.fail_from[second] = 10**9  # then the server fails every request for it
    code, out = run(hub, tmp_path, MULTI, capsys)
    assert code == 1 and "run the command again to resume" in out.err
    model, _ = download.paths(tmp_path / "models", MULTI)
    assert not model.exists()
    partial = model.with_name(model.name + ".partial")
    assert partial.stat().st_size == len(hub.files[f"/{m.repo}/resolve/main/{m.parts[0]}"]) + 5000
    hub.fail_from.clear()
    hub.requests.clear()
    code, out = run(hub, tmp_path, MULTI, capsys)
    assert code == 0, out.err
    assert (second, "bytes=5000-") in hub.requests
    assert not [p for p, _ in hub.requests if p.endswith(m.parts[0])]  # the finished part is not fetched again
    assert model.read_bytes() == hub.model and not leftovers(tmp_path)


def test_a_server_that_ignores_range_still_gives_the_right_file(hub, tmp_path, capsys):
    m = download.MODELS[SINGLE]
    hub.drop_after[f"/{m.repo}/resolve/main/{m.parts[0]}"] = 7000
    hub.ignore_range = True
    code, out = run(hub, tmp_path, SINGLE, capsys)
    assert code == 0, out.err
    assert download.paths(tmp_path / "models", SINGLE)[0].read_bytes() == hub.model


def test_a_wrong_checksum_is_refused_and_nothing_is_left(hub, tmp_path, capsys):
    m = download.MODELS[SINGLE]
    hub.add_model(SINGLE, hub.model, hub.tokenizer, sha_override={m.parts[0]: "0" * 64})
    code, out = run(hub, tmp_path, SINGLE, capsys)
    assert code == 1 and "SHA-256" in out.err and "is not the listed 0000" in out.err and "deleted" in out.err
    assert not download.paths(tmp_path / "models", SINGLE)[0].exists() and not leftovers(tmp_path)


def test_without_a_listing_sizes_are_checked_and_a_short_model_is_refused(hub, tmp_path, capsys):
    m = download.MODELS[SINGLE]
    hub.listings.clear()  # no checksums, no sizes from the hub
    hub.files[f"/{m.repo}/resolve/main/{m.parts[0]}"] = hub.model[:-18]
    code, out = run(hub, tmp_path, SINGLE, capsys)
    assert code == 1 and "no checksums" in out.err
    assert "file is short: expected" in out.err and "deleted" in out.err
    assert not download.paths(tmp_path / "models", SINGLE)[0].exists() and not leftovers(tmp_path)


def test_an_unknown_model_is_named(capsys):
    assert main(["download", "qwen9_huge"]) == 1
    assert "unknown model 'qwen9_huge'" in capsys.readouterr().err


def test_the_printed_inference_command_runs_the_download(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DLLAMA_CACHE_DIR", str(tmp_path / "cache"))
    code, out = run(hub, tmp_path, SINGLE, capsys)
    assert code == 0, out.err
    command = next(shlex.split(line) for line in out.out.splitlines() if line.strip().startswith("dllama inference"))
    assert main([*command[1:], "--nthreads", "1", "--temperature", "0", "--steps", "4"]) == 0
    ran = capsys.readouterr()
    assert ran.out.startswith("Hello world") and "Prediction" in ran.out, ran.err
