"""A model hub on 127.0.0.1 for the download tests (a thread, never the real hosts): files by URL
path, the repository tree listing with sizes and SHA-256, and faults to inject; plus a small real
.m file and .t tokenizer to serve."""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from dllama import download
from dllama.config import Arch, FloatType, ModelConfig
from dllama.dl_tokenizer import tokenizer_bytes
from dllama.model_file import ModelWriter


class Hub:
    """Files by URL path, the tree listing per repository, and faults to inject."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.listings: dict[str, list[dict]] = {}
        self.drop_after: dict[str, int] = {}  # path -> bytes sent before closing (once)
        self.fail_from: dict[str, int] = {}  # path -> every request whose range starts before: HTTP 503
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    def add_model(self, name: str, model: bytes, tokenizer: bytes, sha_override: dict[str, str] | None = None):
        m = download.MODELS[name]
        chunks = np.array_split(np.frombuffer(model, np.uint8), len(m.parts))
        entries = []
        for fname, data in [*zip(m.parts, (c.tobytes() for c in chunks)), (m.tokenizer, tokenizer)]:
            self.files[f"/{m.repo}/resolve/main/{fname}"] = data
            sha = (sha_override or {}).get(fname, hashlib.sha256(data).hexdigest())
            entries.append({"type": "file", "path": fname, "size": len(data), "lfs": {"oid": sha, "size": len(data)}})
        self.listings[f"/api/models/{m.repo}/tree/main"] = entries

    def serve(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                with hub.lock:
                    hub.requests.append((self.path, rng))
                if self.path in hub.listings:
                    body = json.dumps(hub.listings[self.path]).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                data = hub.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng and not hub.ignore_range else 0
                with hub.lock:
                    cut = hub.drop_after.pop(self.path, None)
                if cut is None and start < hub.fail_from.get(self.path, -1) or (start and start >= len(data)):
                    self.send_response(503 if start < len(data) else 416)
                    if start >= len(data):
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        return server, f"http://127.0.0.1:{server.server_address[1]}"


def small_model_bytes(tmp_path: Path) -> bytes:
    """A real (tiny, random f32) Qwen3 .m file, ~150 KB, whose vocabulary is small_tokenizer_bytes'."""
    config = ModelConfig(arch=Arch.QWEN3, dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=258,
                         seq_len=256, weight_type=FloatType.F32, head_dim=16, norm_epsilon=6, rope_theta=1000000)
    rng = np.random.default_rng(0)
    path = tmp_path / "small.m"
    with ModelWriter(path, config) as w:
        for spec in w.layout:
            w.write(spec.name, rng.standard_normal(spec.shape).astype(np.float32))
    return path.read_bytes()


def small_tokenizer_bytes() -> bytes:
    tokens = [bytes([b]) for b in range(256)] + [b"<|im_start|>", b"<|im_end|>"]
    return tokenizer_bytes(tokens, [-float(i) for i in range(len(tokens))], b"{{ messages }}", 256, False, [257])
