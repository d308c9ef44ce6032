"""`dllama download MODEL [--dir D]`: the models Distributed Llama's launch.py offers, in its file
layout (D/MODEL/dllama_model_MODEL.m, several parts joined into one file, and
D/MODEL/dllama_tokenizer_MODEL.t beside it), then the `dllama inference` command that runs them.

What is verified, file by file:
- the size of each part: the hub's listing of the repository (its `api/models/REPO/tree/main`)
  gives it; failing that, the server's Content-Length / Content-Range;
- the SHA-256 of each part, when the listing gives one (large files stored with Git LFS carry
  their `lfs.oid`); Distributed Llama's own list has no checksums, so without the listing only
  sizes are checked, and the command says so;
- the whole: the .m file must be exactly the size its header implies (`dllama.model_file`), the
  .t file must parse (`dllama.dl_tokenizer`).

An interrupted transfer resumes where it stopped (HTTP Range): bytes go to NAME.partial, the parts
already complete are listed in NAME.partial.json. A file that fails a check is deleted, and
nothing ever appears under the final name before every check passed.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shlex
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Where Distributed Llama's launch.py downloads from; --base-url or DLLAMA_DOWNLOAD_BASE_URL
# point elsewhere (a mirror, or a test server).
DEFAULT_BASE_URL = "https://huggingface.co"
BASE_URL_ENV = "DLLAMA_DOWNLOAD_BASE_URL"
CHUNK = 1 << 20
TIMEOUT = 30.0  # seconds without a byte before a connection is given up (and resumed)
ATTEMPTS = 8  # tries without progress before a part fails
MAX_LISTING = 16 << 20


class DownloadError(RuntimeError):
    """A download that cannot complete; the message says what and what was left on disk."""


@dataclass(frozen=True)
class Model:
    repo: str
    parts: tuple[str, ...]  # files joined in this order into the .m file
    tokenizer: str
    chat: bool = True
    max_seq_len: int = 4096


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    """launch.py's part names: PREFIXaa, PREFIXab, ... (two letters, the first advancing every 26)."""
    return tuple(f"{prefix}{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(n))


# launch.py's MODELS, as repository + file names (b4rtaz/distributed-llama).
MODELS: dict[str, Model] = {
    "llama3_1_8b_instruct_q40": Model("b4rtaz/Llama-3_1-8B-Q40-Instruct-Distributed-Llama",
                                      ("dllama_model_llama3.1_instruct_q40.m",), "dllama_tokenizer_llama_3_1.t"),
    "llama3_1_405b_instruct_q40": Model("b4rtaz/Llama-3_1-405B-Q40-Instruct-Distributed-Llama",
                                        _parts("dllama_model_llama31_405b_q40_", 56), "dllama_tokenizer_llama_3_1.t"),
    "llama3_2_1b_instruct_q40": Model("b4rtaz/Llama-3_2-1B-Q40-Instruct-Distributed-Llama",
                                      ("dllama_model_llama3.2-1b-instruct_q40.m",), "dllama_tokenizer_llama3_2.t"),
    "llama3_2_3b_instruct_q40": Model("b4rtaz/Llama-3_2-3B-Q40-Instruct-Distributed-Llama",
                                      ("dllama_model_llama3.2-3b-instruct_q40.m",), "dllama_tokenizer_llama3_2.t"),
    "llama3_3_70b_instruct_q40": Model("b4rtaz/Llama-3_3-70B-Q40-Instruct-Distributed-Llama",
                                       _parts("dllama_model_llama-3.3-70b_q40", 11), "dllama_tokenizer_llama-3.3-70b.t"),
    "deepseek_r1_distill_llama_8b_q40": Model("b4rtaz/DeepSeek-R1-Distill-Llama-8B-Distributed-Llama",
                                              ("dllama_model_deepseek-r1-distill-llama-8b_q40.m",),
                                              "dllama_tokenizer_deepseek-r1-distill-llama-8b.t"),
    "qwen3_0.6b_q40": Model("b4rtaz/Qwen3-0.6B-Q40-Distributed-Llama", ("dllama_model_qwen3_0.6b_q40.m",),
                            "dllama_tokenizer_qwen3_0.6b.t"),
    "qwen3_1.7b_q40": Model("b4rtaz/Qwen3-1.7B-Q40-Distributed-Llama", ("dllama_model_qwen3_1.7b_q40.m",),
                            "dllama_tokenizer_qwen3_1.7b.t"),
    "qwen3_8b_q40": Model("b4rtaz/Qwen3-8B-Q40-Distributed-Llama", ("dllama_model_qwen3_8b_q40.m",),
                          "dllama_tokenizer_qwen3_8b.t"),
    "qwen3_14b_q40": Model("b4rtaz/Qwen3-14B-Q40-Distributed-Llama", _parts("dllama_model_qwen3_14b_q40_", 2),
                           "dllama_tokenizer_qwen3_14b.t"),
    "qwen3_30b_a3b_q40": Model("b4rtaz/Qwen3-30B-A3B-Q40-Distributed-Llama", _parts("dllama_model_qwen3_30b_a3b_", 5),
                               "dllama_tokenizer_qwen3_30b_a3b.t"),
}


def model_name(text: str) -> str:
    """A catalogue name as launch.py takes it (dashes work as underscores)."""
    name = text.replace("-", "_")
    if name not in MODELS:
        raise DownloadError(f"unknown model {text!r}; `dllama download --list` shows the {len(MODELS)} known ones")
    return name


def paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(model, tokenizer) paths of a catalogue model under `directory`, as launch.py lays them out."""
    d = Path(directory) / name
    return d / f"dllama_model_{name}.m", d / f"dllama_tokenizer_{name}.t"


# --------------------------------------------------------------------------------------------
# what the hub says about the files

@dataclass(frozen=True)
class Expected:
    size: int | None = None
    sha256: str | None = None


def listing(base: str, repo: str) -> dict[str, Expected] | None:
    """Sizes and SHA-256 of the repository's files from the hub's tree listing; None if it gives none."""
    try:
        with urllib.request.urlopen(f"{base}/api/models/{repo}/tree/main", timeout=TIMEOUT) as r:
            entries = json.loads(r.read(MAX_LISTING + 1)[:MAX_LISTING])
    except (OSError, ValueError, http.client.HTTPException):
        return None
    if not isinstance(entries, list):
        return None
    out = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            continue
        lfs = e.get("lfs") if isinstance(e.get("lfs"), dict) else {}
        size = lfs.get("size", e.get("size"))
        oid = lfs.get("oid")
        out[e["path"]] = Expected(size if isinstance(size, int) and size >= 0 else None,
                                  oid.lower() if isinstance(oid, str) and re.fullmatch(r"[0-9a-fA-F]{64}", oid) else None)
    return out


# --------------------------------------------------------------------------------------------
# one file, from one or more parts, resumable

_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)|bytes \*/(\d+)")


def _total(response: Any, offset: int) -> tuple[int, int | None]:
    """(where the body starts in the part, the part's size if the server says) for a 200/206."""
    if response.status == 206:
        m = _RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if not m or m.group(1) is None:
            raise DownloadError(f"malformed Content-Range {response.headers.get('Content-Range')!r}")
        return int(m.group(1)), int(m.group(3))
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


@dataclass
class _Part:
    """One part being downloaded: its bytes so far (on disk and in the hash) and its size once known."""

    url: str
    offset: int
    size: int | None
    hasher: Any


def _stream(part: _Part, out: Any, bar: Any) -> None:
    """One request for the rest of the part, its bytes appended to `out` as they come."""
    request = urllib.request.Request(part.url, headers={"Range": f"bytes={part.offset}-"} if part.offset else {})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
        start, total = _total(r, part.offset)
        if start != part.offset and r.status == 206:
            raise DownloadError(f"{part.url}: asked for bytes from {part.offset}, the server sent them from {start}")
        if start != part.offset:  # the server sent the whole part (it ignored Range): start over
            out.seek(out.tell() - part.offset)
            out.truncate()
            bar.update(-part.offset)
            part.offset, part.hasher = 0, hashlib.sha256()
        if total is not None:
            if part.size is not None and total != part.size:
                raise DownloadError(f"{part.url}: the server's size {total} is not the listed {part.size} bytes")
            part.size = total
        while part.size is None or part.offset < part.size:
            chunk = r.read(CHUNK if part.size is None else min(CHUNK, part.size - part.offset))
            if not chunk:
                break
            out.write(chunk)
            part.hasher.update(chunk)
            part.offset += len(chunk)
            bar.update(len(chunk))


def _fetch_part(part: _Part, out: Any, bar: Any) -> None:
    """Appends the rest of the part to `out` (positioned at its end), resuming after a dropped
    connection or a server error; ATTEMPTS tries in a row without a byte end it."""
    tries = 0
    while True:
        before = part.offset
        try:
            _stream(part, out, bar)
            if part.size is None or part.offset == part.size:
                return
            problem = f"the connection ended at byte {part.offset} of {part.size}"
        except urllib.error.HTTPError as e:
            range_ = _RANGE.fullmatch((e.headers or {}).get("Content-Range", "").strip()) if e.code == 416 else None
            if range_ and range_.group(4) is not None and int(range_.group(4)) == part.offset:
                return  # asked from its end: the part was already complete
            if e.code < 500:
                raise DownloadError(f"{part.url}: HTTP {e.code} {e.reason}") from None
            problem = f"HTTP {e.code} {e.reason}"
        except (OSError, http.client.HTTPException) as e:  # dropped, reset, timed out, cut short
            problem = str(e) or type(e).__name__
        tries = 1 if part.offset > before else tries + 1
        if tries >= ATTEMPTS:
            raise DownloadError(f"{part.url}: {problem} ({ATTEMPTS} tries without progress; run the command "
                                "again to resume)")
        print(f"\ndllama download: {part.url}: {problem}; resuming at byte {part.offset}", file=sys.stderr)
        time.sleep(0.5 * tries)


def fetch(urls: list[str], expected: list[Expected], dest: Path, check: Callable[[Path], None],
          progress: bool = True) -> None:
    """Downloads `urls` joined into `dest`, resuming a previous attempt; `check(path)` vets the
    whole before it takes the final name. Every failed check deletes the partial file."""
    partial = dest.with_name(dest.name + ".partial")
    state_path = dest.with_name(dest.name + ".partial.json")
    done = _done_parts(state_path, urls) if partial.exists() else None
    if done is None:  # nothing to resume from (or another file's): start afresh
        partial.unlink(missing_ok=True)
        done = []
    state_path.write_text(json.dumps({"urls": urls, "done": done}))
    start = sum(int(d["size"]) for d in done)
    known = [e.size for e in expected]
    total = sum(known) if all(s is not None for s in known) else None  # type: ignore[misc]
    partial.touch()
    with open(partial, "r+b") as out, _bar(total, dest.name, progress) as bar:
        out.seek(0, os.SEEK_END)
        if out.tell() < start:  # the partial file lost bytes the state counts: start again
            out.truncate(0)
            done, start = [], 0
        bar.update(out.tell())
        for i in range(len(done), len(urls)):
            have = out.seek(0, os.SEEK_END) - start  # this part's bytes from the last attempt
            hasher = hashlib.sha256()
            out.seek(start)
            while have and (chunk := out.read(CHUNK)):
                hasher.update(chunk)
            out.seek(start + have)
            part = _Part(urls[i], have, expected[i].size, hasher)
            _fetch_part(part, out, bar)
            size, digest = part.offset, part.hasher.hexdigest()
            if expected[i].sha256 and digest != expected[i].sha256:
                out.close()
                _remove(partial, state_path)
                raise DownloadError(f"{urls[i]}: SHA-256 {digest} is not the listed {expected[i].sha256}; "
                                    "the damaged download was deleted")
            done.append({"url": urls[i], "size": size, "sha256": digest})
            start += size
            state_path.write_text(json.dumps({"urls": urls, "done": done}))
    try:
        check(partial)
    except Exception as e:
        _remove(partial, state_path)
        raise DownloadError(f"{dest}: {e}; the damaged download was deleted") from None
    os.replace(partial, dest)
    state_path.unlink(missing_ok=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _bar(total: int | None, name: str, progress: bool) -> Any:
    """tqdm's bar (dllama.progress) when asked for; none otherwise, so an Ansible controller
    without tqdm can download."""
    if not progress:
        return _NoBar()
    from .progress import byte_bar

    return byte_bar(total, name)  # type: ignore[arg-type]


def _done_parts(state_path: Path, urls: list[str]) -> list[dict[str, Any]] | None:
    """The parts a previous attempt at these urls completed, or None when there was none."""
    try:
        state = json.loads(state_path.read_text())
        if state["urls"] != urls:
            return None
        done = [dict(d) for d in state["done"]]
        if len(done) > len(urls) or any(not isinstance(d.get("size"), int) or d["size"] < 0 for d in done):
            return None
        return done
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _remove(*files: Path) -> None:
    for f in files:
        f.unlink(missing_ok=True)


def _check_model(path: Path) -> None:
    from .model_file import ModelFile

    with ModelFile.open(path):
        pass  # opening checks the magic, the header and the exact size the header implies


def _check_tokenizer(path: Path) -> None:
    from .dl_tokenizer import TokenizerFile

    TokenizerFile.read(path)


# --------------------------------------------------------------------------------------------
# the command

def download(name: str, directory: str | os.PathLike = "models", base: str | None = None,
             progress: bool = True, log: Any = None) -> tuple[Path, Path]:
    """Downloads (or finds complete) a catalogue model; returns its (model, tokenizer) paths.
    Notes go to `log` (default: stderr)."""
    log = log or sys.stderr
    model = MODELS[model_name(name)]
    base = (base or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    model_path, tokenizer_path = paths(directory, model_name(name))
    model_path.parent.mkdir(parents=True, exist_ok=True)
    files = listing(base, model.repo)
    if files is None:
        print("dllama download: the hub gives no file listing here, so no checksums: checking sizes "
              "(the server's, and the .m file's against its header) only", file=log)
    elif not all((files.get(f) or Expected()).sha256 for f in (*model.parts, model.tokenizer)):
        print("dllama download: some files have no checksum in the hub's listing: their sizes are checked",
              file=log)
    for dest, names, check in ((model_path, model.parts, _check_model), (tokenizer_path, (model.tokenizer,),
                                                                           _check_tokenizer)):
        if dest.is_file():
            try:
                check(dest)
                print(f"dllama download: {dest} is already complete", file=log)
                continue
            except Exception as e:
                raise DownloadError(f"{dest} exists but is damaged ({e}); delete it to download again") from None
        urls = [f"{base}/{model.repo}/resolve/main/{f}" for f in names]
        fetch(urls, [(files or {}).get(f) or Expected() for f in names], dest, check, progress)
    return model_path, tokenizer_path


def run_commands(name: str, model_path: Path, tokenizer_path: Path) -> list[str]:
    """The commands that run a downloaded catalogue model: a chat (launch.py's, for its chat
    models) and a one-prompt `dllama inference`."""
    model = MODELS[name]
    flags = (f"--model {shlex.quote(str(model_path))} --tokenizer {shlex.quote(str(tokenizer_path))} --buffer-float-type q80 "
             f"--max-seq-len {model.max_seq_len}")
    commands = [f"dllama chat {flags}"] if model.chat else []
    return commands + [f'dllama inference {flags} --prompt "Hello world" --steps 64']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="the model's name (see --list)")
    parser.add_argument("--dir", default="models", help="where to put MODEL/ (default: ./models)")
    parser.add_argument("--list", action="store_true", help="list the models this command knows")
    parser.add_argument("--base-url", default=None,
                        help=f"the hub to download from (default: ${BASE_URL_ENV} or {DEFAULT_BASE_URL})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.list or not args.model:
        for name, m in MODELS.items():
            parts = f", {len(m.parts)} parts" if len(m.parts) > 1 else ""
            print(f"{name:36s} {m.repo}{parts}")
        return 0 if args.list else 2
    name = model_name(args.model)
    model_path, tokenizer_path = download(name, args.dir, args.base_url, progress=not args.no_progress)
    commands = "\n    ".join(run_commands(name, model_path, tokenizer_path))
    print(f"downloaded {model_path} and {tokenizer_path}; run it with:\n\n    {commands}\n")
    return 0
