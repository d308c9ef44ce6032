"""Distributed Llama's `.t` tokenizer files: read them as a `tokenizers` byte-level BPE, write them
from a Hugging Face tokenizer directory byte for byte as its converter does.

Layout (its converter/tokenizer-writer.py and src/tokenizer.cpp; little-endian):

    int32 magic 0x567124 | int32 headerSize (counts magic and itself) | (int32 key, int32 value)*
    | chat template (CHAT_TEMPLATE bytes, UTF-8) | int32 eos id * N_EOS_TOKENS
    | per token: float32 score, uint32 length, bytes

Its Hugging Face converter writes token i's raw bytes with score -i, BOS and EOS from config.json,
ADD_BOS from tokenizer_config.json (default 1), the template from tokenizer_config.json. The
reader takes ids below BOS as the BPE vocabulary (rank = id, the merges rebuilt from the ranks:
the one split a BPE over lower ranks gives, as for tiktoken vocabularies) and ids from BOS up as
added tokens, as Distributed Llama does; `<|...|>` ones are special (but for a few Qwen marks as
plain). The pre-tokenizer is the
model family's (Qwen3 or Llama 3, told apart by their special tokens), so ids equal the
Hugging Face tokenizer's.
"""
from __future__ import annotations

import functools
import os
import re
import struct
from pathlib import Path
from typing import Any

from .json_file import read_json_object

MAGIC = 0x567124
OLD_MAGIC = 0x567123
VERSION, VOCAB_SIZE, MAX_TOKEN_LENGTH, BOS_ID, EOS_ID, PAD_ID, CHAT_EOS_ID = 0, 1, 2, 3, 4, 5, 6
CHAT_TEMPLATE, CHAT_STOP, N_EOS_TOKENS, ADD_BOS = 7, 8, 9, 10
KEYS = range(11)
# bounds on what a file may make us allocate
MAX_PAIRS = 64
MAX_VOCAB = 1 << 21
MAX_TOKEN_BYTES = 1 << 16
MAX_TEMPLATE = 1 << 20
MAX_EOS = 1024

# Pre-tokenizer splits of the families whose .t files Distributed Llama distributes.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = re.compile(rb"<\|[^|]+\|>")
# ...except these, which Qwen's tokenizer.json marks as plain added tokens (kept by
# decode(skip_special_tokens=True)), like <think> and <tool_call>
QWEN_PLAIN = {b"<|fim_prefix|>", b"<|fim_middle|>", b"<|fim_suffix|>", b"<|fim_pad|>", b"<|repo_name|>",
              b"<|file_sep|>"}


class TokenizerFileError(ValueError):
    """A .t file that cannot be read or written; the message names the file and the problem."""


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# --------------------------------------------------------------------------------------------
# reading

class TokenizerFile:
    """The contents of a .t file."""

    def __init__(self, tokens: list[bytes], scores: list[float], bos_id: int | None, eos_ids: list[int],
                 add_bos: bool, chat_template: str | None):
        self.tokens, self.scores = tokens, scores
        self.bos_id, self.eos_ids, self.add_bos, self.chat_template = bos_id, eos_ids, add_bos, chat_template

    @classmethod
    def read(cls, path: str | os.PathLike) -> TokenizerFile:
        where = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise TokenizerFileError(f"{where}: cannot read ({e.strerror})") from None
        at = 0

        def take(n: int, what: str) -> bytes:
            nonlocal at
            if n < 0 or at + n > len(data):
                raise TokenizerFileError(f"{where}: truncated at {what} (byte {at}, file has {len(data)})")
            at += n
            return data[at - n : at]

        (magic,) = struct.unpack("<i", take(4, "the magic"))
        if magic == OLD_MAGIC:
            raise TokenizerFileError(f"{where}: old Distributed Llama tokenizer format; regenerate it")
        if magic != MAGIC:
            raise TokenizerFileError(f"{where}: not a Distributed Llama .t tokenizer (magic 0x{magic & 0xFFFFFFFF:08X})")
        (size,) = struct.unpack("<i", take(4, "the header size"))
        if size < 8 or (size - 8) % 8 or (size - 8) // 8 > MAX_PAIRS:
            raise TokenizerFileError(f"{where}: bad header size {size}")
        values: dict[int, int] = {}
        eos_ids: list[int] = []
        skip = 0
        for key, value in struct.iter_unpack("<ii", take(size - 8, "the header")):
            if key not in KEYS:
                raise TokenizerFileError(f"{where}: unknown header key {key}")
            if key in (EOS_ID, CHAT_EOS_ID):  # older files: single ids in the header
                eos_ids.append(value)
            elif key == CHAT_STOP:  # older files: a stop string after the header, unused
                skip += value
            values[key] = value
        if values.get(VERSION) != 1:
            raise TokenizerFileError(f"{where}: tokenizer version {values.get(VERSION)} (only 1 is supported)")
        n = values.get(VOCAB_SIZE, 0)
        max_len = values.get(MAX_TOKEN_LENGTH, 0)
        template_len = values.get(CHAT_TEMPLATE, 0)
        n_eos = values.get(N_EOS_TOKENS, 0)
        for name, v, top in (("vocab size", n, MAX_VOCAB), ("max token length", max_len, MAX_TOKEN_BYTES),
                             ("chat template length", template_len, MAX_TEMPLATE), ("eos count", n_eos, MAX_EOS),
                             ("stop string length", skip, MAX_TEMPLATE)):
            if not 0 <= v <= top:
                raise TokenizerFileError(f"{where}: {name} {v} is out of range (0..{top})")
        if n < 1 or max_len < 1:
            raise TokenizerFileError(f"{where}: empty vocabulary")
        take(skip, "the stop string")
        template = None
        if template_len > 0:
            try:
                template = take(template_len, "the chat template").decode("utf-8")
            except UnicodeDecodeError:
                raise TokenizerFileError(f"{where}: the chat template is not UTF-8") from None
        eos_ids += [i for (i,) in struct.iter_unpack("<i", take(4 * n_eos, "the eos ids"))]
        tokens, scores = [], []
        for i in range(n):
            score, length = struct.unpack("<fI", take(8, f"token {i}"))
            if not 0 < length <= max_len:
                raise TokenizerFileError(f"{where}: token {i} has length {length} (1..{max_len})")
            tokens.append(take(length, f"token {i}"))
            scores.append(score)
        if at != len(data):
            raise TokenizerFileError(f"{where}: {len(data) - at} bytes after the last token")
        bos = values.get(BOS_ID)
        for what, ids in (("BOS", [] if bos is None else [bos]), ("EOS", eos_ids)):
            for i in ids:
                if not 0 <= i < n:
                    raise TokenizerFileError(f"{where}: {what} id {i} is outside the vocabulary (0..{n - 1})")
        return cls(tokens, scores, bos, eos_ids, values.get(ADD_BOS, 1) == 1, template)

    # as a tokenizers.Tokenizer

    def hf_tokenizer(self, where: str = "<.t file>") -> Any:
        """A `tokenizers.Tokenizer` giving the ids the model's Hugging Face tokenizer gives."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        if self.bos_id is None:
            raise TokenizerFileError(f"{where}: no BOS id (Distributed Llama splits regular and special "
                                     "tokens there)")
        regular = self.tokens[: self.bos_id]
        added = self.tokens[self.bos_id :]
        if any(s <= t for s, t in zip(self.scores, self.scores[1:])):
            raise TokenizerFileError(f"{where}: scores do not fall with the id; not a byte-level BPE "
                                     "tokenizer (a SentencePiece one?), which is not supported")
        if b"<|im_start|>" in added:  # Qwen2/Qwen3
            pattern, nfc, ignore_merges, plain = QWEN2_PATTERN, True, False, QWEN_PLAIN
        elif b"<|begin_of_text|>" in added:  # Llama 3
            pattern, nfc, ignore_merges, plain = LLAMA3_PATTERN, False, True, set()
        else:
            raise TokenizerFileError(f"{where}: unknown tokenizer family (neither Qwen3's <|im_start|> nor "
                                     "Llama 3's <|begin_of_text|> among its special tokens)")
        b2u = byte_to_unicode()
        text = ["".join(b2u[b] for b in t) for t in regular]
        vocab = {t: i for i, t in enumerate(text)}
        if len(vocab) != len(text):
            raise TokenizerFileError(f"{where}: the vocabulary repeats a token")
        merges = _merges(regular, where)
        tk = Tokenizer(BPE(vocab, [(text[a], text[b]) for a, b in merges], fuse_unk=False,
                           ignore_merges=ignore_merges))
        if nfc:
            tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
        tk.decoder = decoders.ByteLevel()
        for i, raw in enumerate(added, start=self.bos_id):
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TokenizerFileError(f"{where}: added token {i} is not UTF-8") from None
            special = bool(SPECIAL.fullmatch(raw)) and raw not in plain
            tk.add_tokens([AddedToken(content, special=special, normalized=False)])
            if tk.token_to_id(content) != i:
                raise TokenizerFileError(f"{where}: added token {i} {content!r} repeats another token")
        return tk

    def tokenizer_config(self) -> dict[str, Any]:
        """What tokenizer_config.json would say: BOS/EOS tokens, add_bos_token, chat template."""
        def text(i: int) -> str:
            return self.tokens[i].decode("utf-8", errors="replace")

        config: dict[str, Any] = {"add_bos_token": self.add_bos}
        if self.bos_id is not None:
            config["bos_token"] = text(self.bos_id)
        if self.eos_ids:
            config["eos_token"] = text(self.eos_ids[0])
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config


def _merges(tokens: list[bytes], where: str) -> list[tuple[int, int]]:
    """(left id, right id) for each multi-byte token in rank order: the last merge a byte-level BPE
    restricted to lower ranks makes when it spells the token (tiktoken's ranks -> merges)."""
    ranks = {t: i for i, t in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        if len(token) == 1:
            continue
        splits = [k for k in range(1, len(token)) if ranks.get(token[:k], rank) < rank
                  and ranks.get(token[k:], rank) < rank]
        if len(splits) == 1:  # most tokens: only one way to build it from two lower ones
            merges.append((ranks[token[: splits[0]]], ranks[token[splits[0] :]]))
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best:
                    best, at = r, i
            if at < 0:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2 or parts[0] not in ranks or parts[1] not in ranks:
            raise TokenizerFileError(f"{where}: token {rank} {token!r} cannot be built from lower-ranked tokens; "
                                     "not a byte-level BPE vocabulary")
        merges.append((ranks[parts[0]], ranks[parts[1]]))
    return merges


# --------------------------------------------------------------------------------------------
# writing, as Distributed Llama's converter/convert-tokenizer-hf.py does

def tokenizer_bytes(tokens: list[bytes], scores: list[float], chat_template: bytes | None, bos_id: int | None,
                    add_bos: bool, eos_ids: list[int]) -> bytes:
    """tokenizer-writer.py writeTokenizer: the header keys in its order (BOS_ID first, skipped when
    unknown; CHAT_TEMPLATE only with a template), the template, the EOS ids, the tokens."""
    pairs = [(BOS_ID, bos_id), (VERSION, 1), (VOCAB_SIZE, len(tokens)),
             (MAX_TOKEN_LENGTH, max(len(t) for t in tokens))]
    if chat_template:
        pairs.append((CHAT_TEMPLATE, len(chat_template)))
    pairs += [(N_EOS_TOKENS, len(eos_ids)), (ADD_BOS, 1 if add_bos else 0)]
    data = b"".join(struct.pack("<ii", k, v) for k, v in pairs if v is not None)
    out = [struct.pack("<ii", MAGIC, 8 + len(data)), data, chat_template or b""]
    out += [struct.pack("<i", i) for i in eos_ids]
    for token, score in zip(tokens, scores):
        out.append(struct.pack("<fI", score, len(token)) + token)
    return b"".join(out)


def _json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path, TokenizerFileError)
    except FileNotFoundError:
        raise TokenizerFileError(f"{path.parent}: no {path.name}") from None


def from_hf_dir(hf_dir: str | os.PathLike) -> bytes:
    """The .t file Distributed Llama's convert-tokenizer-hf.py writes for a model directory
    (tokenizer.json, tokenizer_config.json and config.json for BOS/EOS, as it reads them)."""
    import tokenizers

    hf_dir = Path(hf_dir)
    tk_config = _json(hf_dir / "tokenizer_config.json")
    cls = tk_config.get("tokenizer_class")
    if cls not in ("PreTrainedTokenizerFast", "LlamaTokenizerFast", "Qwen2Tokenizer"):
        raise TokenizerFileError(f"{hf_dir}: tokenizer_class {cls!r} is not supported (byte-level BPE: "
                                 "PreTrainedTokenizerFast, LlamaTokenizerFast, Qwen2Tokenizer)")
    try:
        tk = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    except Exception as e:  # tokenizers raises its own Exception type
        raise TokenizerFileError(f"{hf_dir}: cannot read tokenizer.json: {e}") from None
    u2b = {u: b for b, u in byte_to_unicode().items()}
    n = len(tk.get_vocab(with_added_tokens=True))
    tokens = []
    for i in range(n):
        token = tk.id_to_token(i)
        if token is None:
            raise TokenizerFileError(f"{hf_dir}: the vocabulary has no id {i} (ids must be 0..{n - 1})")
        tokens.append(b"".join(bytes([u2b[c]]) if c in u2b else c.encode("utf-8") for c in token))
    # its tokenizer (made from tokenizer.json alone) knows no BOS/EOS: config.json gives them
    model_config = _json(hf_dir / "config.json")
    if model_config.get("bos_token_id") is None or model_config.get("eos_token_id") is None:
        raise TokenizerFileError(f"{hf_dir}/config.json: no bos_token_id / eos_token_id")
    eos = model_config["eos_token_id"]
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    template = tk_config.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").is_file():  # newer checkpoints (it writes none)
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise TokenizerFileError(f"{hf_dir}: chat_template is not a string (several named templates?)")
    return tokenizer_bytes(tokens, [-float(i) for i in range(n)], template.encode("utf-8") if template else None,
                           int(model_config["bos_token_id"]), tk_config.get("add_bos_token", True), eos_ids)


def is_tokenizer_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file starting with a .t magic (of either version)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<i", head)[0] in (MAGIC, OLD_MAGIC)


# --------------------------------------------------------------------------------------------
# loading, with the rebuilt tokenizer cached (rebuilding the merges takes seconds on a board)

BUILD = b"dl-tokenizer-1"  # change when hf_tokenizer builds differently: old cache entries then go unused


def cache_root() -> Path:
    """$DLLAMA_CACHE_DIR, else $XDG_CACHE_HOME/dllama, else ~/.cache/dllama."""
    base = os.environ.get("DLLAMA_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dllama"


def cache_dir() -> Path:
    return cache_root() / "tokenizers"


def load(path: str | os.PathLike) -> tuple[Any, TokenizerFile]:
    """(the tokenizers.Tokenizer, the file's contents) for a .t file. The tokenizer is kept as a
    tokenizer.json under cache_dir(), named by the .t file's hash, and reused from there."""
    import hashlib
    import tempfile

    import tokenizers

    where = str(path)
    tf = TokenizerFile.read(path)
    digest = hashlib.blake2b(Path(path).read_bytes(), digest_size=16, person=BUILD).hexdigest()
    cached = cache_dir() / f"{digest}.json"
    if cached.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(cached)), tf
        except Exception:  # a damaged cache entry: rebuild it
            pass
    tk = tf.hf_tokenizer(where)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        os.close(fd)
        tk.save(tmp)
        os.replace(tmp, cached)
    except OSError:
        pass  # no writable cache: rebuilt next time
    return tk, tf


# --------------------------------------------------------------------------------------------
# command line: mounted by the dllama CLI as `dllama convert-tokenizer`

def add_arguments(parser: Any) -> None:
    parser.add_argument("hf_dir", type=Path, help="Hugging Face model directory (tokenizer.json, "
                        "tokenizer_config.json, config.json)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .t file to write")


def run(args: Any) -> int:
    """Writes the file (through a temporary name: a failure leaves nothing under the final one)."""
    data = from_hf_dir(args.hf_dir)
    tmp = args.output.with_name(args.output.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, args.output)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {args.output}: {len(data)} bytes")
    return 0
