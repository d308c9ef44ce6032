"""The cluster's sync over an emulated Pi network: root and workers each in a network namespace
of their own, joined by a bridge (in a namespace too: nothing of this machine's network is
touched), every link shaped like a Pi 5's gigabit port with tc netem (rate both ways, the one-way
delay on the way out, MTU 9000), one thread per node (--nthreads), N = 2, 4 and 8 nodes.

For each N, two models: the `bench` preset (Qwen3-30B-A3B's layer shape) and the `sync` preset
(the same 2048-wide residual, so the same all-reduce payloads, with next to no compute): decode
tok/s, sync ms per token and KB sent + received per token by the root, scaled to the real 48
layers, and the share of the root's bytes that left while the matmul producing them still ran
(a node of one thread sends each partial whole: none; with --nthreads 2 or more it sends a
one-token partial in pieces, which needs 2 x N cores to mean anything). The sync-only figure
is the network's share; the bench figure adds the wait for the slowest node's compute (on
this 2-core machine N processes share 2 cores: its skew is not a Pi's). Then the Pi 5
projection (tests/pi5_projection.py).

Run with `make bench-cluster` (root: ip netns, tc). Namespaces are named dlb<pid>-*, deleted on
exit, also on an error or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUBNET = "10.213.0"  # addresses exist only inside the namespaces made here
PORT = 9999
REAL_LAYERS = 48
PRESET_OF = {"bench": "bench", "sync": "sync"}


def sh(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


def shape(exec_in: list[str], dev: str, rate: str, delay_ms: float) -> bool:
    """tc netem on dev: the rate and (when delay_ms) the delay. A kernel without sch_netem gets
    tbf (the rate alone): returns whether the delay is emulated."""
    netem = [*exec_in, "tc", "qdisc", "add", "dev", dev, "root", "netem", "rate", rate, "limit", "100000"]
    try:
        sh(*netem, *(["delay", f"{delay_ms}ms"] if delay_ms else []))
        return True
    except RuntimeError as e:
        if "unknown" not in str(e):
            raise
    # the bucket holds the largest (GSO) packet a veth passes, 64 KB, twice
    sh(*exec_in, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "128kb", "latency", "50ms")
    return False


class PiNetwork:
    """N namespaces (node k at SUBNET.(k+1)) on one bridge; links shaped like a Pi 5's."""

    def __init__(self, nodes: int, rate: str, delay_ms: float, mtu: int) -> None:
        self.prefix = f"dlb{os.getpid()}"
        self.bridge = f"{self.prefix}-br"
        self.names = [f"{self.prefix}-n{k}" for k in range(nodes)]
        self.made: list[str] = []
        self.delay_emulated = True
        try:
            self._make(rate, delay_ms, mtu)
        except BaseException:
            self.close()
            raise

    def address(self, k: int) -> str:
        return f"{SUBNET}.{k + 1}"

    def _make(self, rate: str, delay_ms: float, mtu: int) -> None:
        sh("ip", "netns", "add", self.bridge)
        self.made.append(self.bridge)
        sh("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for k, ns in enumerate(self.names):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            port = f"p{k}"
            sh("ip", "-n", self.bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.bridge, "link", "set", port, "mtu", str(mtu), "master", "br0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "mtu", str(mtu), "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", "eth0")
            # out of the node: the link's rate and its one-way delay; into it (the switch port):
            # the rate only, so a packet between two nodes is delayed once
            self.delay_emulated &= shape(["ip", "netns", "exec", ns], "eth0", rate, delay_ms)
            shape(["ip", "netns", "exec", self.bridge], port, rate, 0.0)

    def exec(self, k: int, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[k], *cmd]

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()


def model_path(preset: str, layers: int) -> Path:
    from bench import CACHE
    from dllama.testing.checkpoint import make_model_file

    path = CACHE / (f"bench-{layers}L-q40.m" if preset == "bench" else f"{preset}-{layers}L-q40.m")
    if not path.exists():
        print(f"generating {path} (once; cached outside the repo) ...", flush=True)
        make_model_file(path, preset=PRESET_OF[preset], layers=layers, seed=0, weights="q40")
    return path


def run_cluster(net: PiNetwork, model: Path, args, logs: Path) -> dict:
    """Workers 1..N-1 in their namespaces (their logs in `logs`), the root (this script, --root)
    in node 0's."""
    workers = []
    try:
        for k in range(1, len(net.names)):
            with open(logs / f"worker{k}.log", "w") as log:
                workers.append(subprocess.Popen(
                    net.exec(k, sys.executable, "-m", "dllama", "worker", "--host", net.address(k), "--port", str(PORT),
                             "--nthreads", str(args.nthreads), "--timeout", str(args.worker_timeout)),
                    stdout=subprocess.DEVNULL, stderr=log))
        addresses = ",".join(f"{net.address(k)}:{PORT}" for k in range(1, len(net.names)))
        proc = subprocess.run(
            net.exec(0, sys.executable, str(Path(__file__)), "--root", str(model), "--workers", addresses,
                     "--decode-tokens", str(args.decode_tokens), "--prompt-tokens", str(args.prompt_tokens),
                     "--nthreads", str(args.nthreads)),
            capture_output=True, text=True, timeout=args.run_timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"root failed (worker logs in {logs}):\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        for w in workers:
            try:
                w.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()


def wait_listening(address: str, seconds: float = 60) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {address} did not listen in {seconds:.0f} s") from None
            time.sleep(0.2)


def root_main(args) -> None:
    """Inside node 0's namespace: the engine over the workers; one JSON line of figures."""
    import numpy as np
    from bench import timed_decode
    from dllama import Engine
    from dllama.engine import TOPK, Entry

    addresses = args.workers.split(",")
    for a in addresses:
        wait_listening(a)
    model = Path(args.root)
    with Engine(model, nthreads=args.nthreads, max_seq_len=args.prompt_tokens + args.decode_tokens + 8,
                workers=addresses) as engine:
        vocab = engine.config.vocab_size
        layers = engine.config.n_layers
        prompt = np.random.default_rng(0).integers(0, vocab, size=args.prompt_tokens).tolist()
        engine.reset(0)
        engine.step([Entry(0, prompt[:8], TOPK, 0.0)])  # warm up: page cache, threads, sockets
        engine.reset(0)
        start = time.perf_counter()
        engine.step([Entry(0, prompt, TOPK, 0.0)])
        prefill_s = time.perf_counter() - start
        prefill = engine.stats()
        decode = timed_decode(engine, prompt, args.decode_tokens)
    n = args.decode_tokens
    print(json.dumps(dict(
        layers=layers, tok_s=decode["tok_s"], sync_ms=decode["sync"] / n, sent_kb=decode["sent"] / n,
        recv_kb=decode["recv"] / n, early_pct=100 * decode["early"] / max(decode["sent"], 1e-9), prefill_tok_s=args.prompt_tokens / prefill_s,
        prefill_sync_ms=prefill["sync_ms"] / args.prompt_tokens)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="2,4,8")
    parser.add_argument("--rate", default="1gbit", help="link rate, tc's units (default 1gbit)")
    parser.add_argument("--delay-ms", type=float, default=0.05, help="one-way delay per link (default 0.05)")
    parser.add_argument("--mtu", type=int, default=9000)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--nthreads", type=int, default=1,
                        help="threads per node (1: what a 2-core machine can give N nodes)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--models", default="sync,bench", help="sync (network only), bench (with compute)")
    parser.add_argument("--run-timeout", type=float, default=1200, help="seconds one cluster run may take")
    # the root sends the weight slices one worker after another: the last one waits for all
    parser.add_argument("--worker-timeout", type=float, default=900, help="the workers' --timeout")
    parser.add_argument("--logs", type=Path, default=Path("out/bench-cluster"), help="the workers' logs")
    parser.add_argument("--root", help=argparse.SUPPRESS)  # internal: run as the root in node 0
    parser.add_argument("--workers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.root:
        root_main(args)
        return
    if os.geteuid() != 0:
        sys.exit("bench-cluster makes network namespaces: run it as root")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # through the finally blocks below
    models = {m: model_path(m, args.layers) for m in args.models.split(",")}
    print(f"emulated Pi network: {args.rate} per link, {args.delay_ms} ms one-way delay, MTU {args.mtu}; "
          f"{args.nthreads} thread(s) per node; {args.layers} layers run, figures per token scaled to {REAL_LAYERS}")
    print(f"{'nodes':>5} {'model':>6} {'decode tok/s':>12} {'sync ms/tok':>12} {'sync ms/tok @48L':>16} "
          f"{'KB/tok @48L':>11} {'sent early %':>12} {'prefill sync ms/tok @48L':>24}", flush=True)
    results = {}
    delay_emulated = True
    for nodes in (int(x) for x in args.nodes.split(",")):
        for name, model in models.items():
            net = PiNetwork(nodes, args.rate, args.delay_ms, args.mtu)
            delay_emulated &= net.delay_emulated
            try:
                logs = args.logs / f"{nodes}-{name}"
                logs.mkdir(parents=True, exist_ok=True)
                r = run_cluster(net, model, args, logs)
            except (RuntimeError, subprocess.TimeoutExpired, MemoryError) as e:
                print(f"{nodes:5d} {name:>6} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}",
                      flush=True)
                continue
            finally:
                net.close()
            scale = REAL_LAYERS / r["layers"]
            results[nodes, name] = dict(r, scale=scale)
            print(f"{nodes:5d} {name:>6} {r['tok_s']:12.2f} {r['sync_ms']:12.2f} {r['sync_ms'] * scale:16.2f} "
                  f"{(r['sent_kb'] + r['recv_kb']) * scale:11.1f} {r['early_pct']:12.0f} {r['prefill_sync_ms'] * scale:24.3f}",
                  flush=True)
    # Every all-reduce is one exchange among all nodes at once (one one-way delay), two a layer,
    # plus the root's step message and the workers' replies: what a kernel without sch_netem
    # cannot delay is added to the projection's sync instead.
    one_way_delays = 2 * REAL_LAYERS + 2
    added = 0.0 if delay_emulated else one_way_delays * args.delay_ms
    if not delay_emulated:
        print(f"this kernel has no sch_netem: links shaped by tbf (rate only), the {args.delay_ms} ms one-way delay "
              f"not emulated; the projection adds {one_way_delays} x {args.delay_ms} = {added:.2f} ms per token")
    from pi5_projection import print_projection

    print_projection({n: dict(decode_ms=r["sync_ms"] * r["scale"] + added,
                              prefill_ms=r["prefill_sync_ms"] * r["scale"] + added / args.prompt_tokens,
                              kb=(r["sent_kb"] + r["recv_kb"]) * r["scale"])
                      for (n, m), r in results.items() if m == "sync"})


if __name__ == "__main__":
    main()
