"""Qwen3-30B-A3B Q40 on 1, 2, 4 and 8 Raspberry Pi 5 8 GB: a projection from named inputs.

    memory per node  = Q40 matrices / N + the F32 embedding (every node holds it) + KV cache at
                       4096 positions (F32; its kv heads shared by N) + the engine
    decode ms/token  = max(DRAM time, kernel time) of the node's share of the weights a token
                       reads + sync: the network's floor with the all-reduce's sends overlapped
                       with the matmul producing them (overlapped_floor_ms; without the overlap:
                       network_floor_ms), and beside it the sync measured over the emulated
                       network (bench_cluster.py)
    prefill tok/s    = 1 / (the node's active Q40 group-blocks per token x the prefill tile's
                       cycles per group-block per token / (4 cores x 2.4 GHz) + the floor's
                       sync per prompt token)

Not in the model: attention over the KV cache, norms, the router and the sampler (a few % of a
decode step at short contexts), and the cores' skew at a sync.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PI5_CORES, PI5_GHZ = 4, 2.4  # Raspberry Pi 5: 4 x Cortex-A76 at 2.4 GHz (issue #17)
PI5_DRAM_GBS = 10.0  # LPDDR4X "roughly 10-12 GB/s" (issue #17): the lower end
PI5_RAM_GB = 8.0
ENGINE_GB = 0.3  # Python, the core's buffers, the OS's share: assumed, not measured
KV_POSITIONS = 4096
PREFILL_TOKENS = 128
LINK_GBIT, DELAY_MS = 1.0, 0.05  # gigabit Ethernet; the one-way delay bench-cluster emulates by default
# bytes a message carries besides its payload: the data plane's 16-byte tag, TCP/IP and Ethernet
# headers with preamble and gap (one segment at MTU 9000)
WIRE_OVERHEAD = 16 + 66 + 20
NODES = (1, 2, 4, 8)
# a one-token partial goes to the mesh in this many pieces as its matmul finishes them
# (native/cluster.h kAllReducePieces); a prompt's partials go whole
ALL_REDUCE_PIECES = 4
# Distributed Llama on 4 x Pi 5 8 GB, Qwen3-30B-A3B Q40 (issue #17)
REFERENCE = dict(nodes=4, decode_tok_s=13.04, prefill_tok_s=14.33, sent_kb=636, sync_ms="14-94")


def qwen3_30b_a3b():
    from dllama.convert import config_from_hf
    from dllama.testing.checkpoint import hf_config

    return config_from_hf(hf_config("bench", "qwen3_moe", layers=48), "q40")


def network_floor_ms(c, nodes: int, tokens: int) -> float:
    """The least sync a step of `tokens` tokens can take on the mesh: per all-reduce every node
    sends its Q80 partial to each of the other nodes through its one link (and receives as much
    on the other direction), then one one-way delay; two a layer, plus the root's step message
    and the workers' top-k replies (520 bytes each) into the root."""
    if nodes == 1:
        return 0.0
    bit_ms = 8 / (LINK_GBIT * 1e9) * 1e3
    partial = tokens * c.dim // 32 * 34 + WIRE_OVERHEAD
    all_reduce = (nodes - 1) * partial * bit_ms + DELAY_MS
    return 2 * c.n_layers * all_reduce + 2 * DELAY_MS + (nodes - 1) * (520 * tokens + WIRE_OVERHEAD) * bit_ms


def exposed_piece_ms(compute_ms: float, link_ms: list[float]) -> float:
    """The time the link needs after a matmul ends to finish sending its output, made in
    len(link_ms) equal pieces of compute_ms in total, piece i taking link_ms[i] on the link: a
    piece leaves once it is computed and the one before it has left."""
    k = len(link_ms)
    link_free = 0.0
    for i, ms in enumerate(link_ms):
        link_free = max(link_free, compute_ms * (i + 1) / k) + ms
    return link_free - compute_ms


def overlapped_floor_ms(c, nodes: int) -> float:
    """network_floor_ms of a one-token step with every all-reduce's partial sent in pieces while
    the matmul making it runs (a node of 2 or more threads does: a Pi runs 4): per all-reduce
    the one-way delay plus what of the link's work the matmul cannot hide (the last piece's, and
    more where the link is slower than the matmul). The producing matmuls (a node's share, read
    from DRAM at PI5_DRAM_GBS): the attention's output projection (dim x q_dim / N) and the 8
    active experts' down projections (dim x moe_hidden / N each). A piece is its own segment
    (headers each); the tag rides on the last."""
    from bench import matrix_bytes

    if nodes == 1:
        return 0.0
    bit_ms = 8 / (LINK_GBIT * 1e9) * 1e3
    blocks = c.dim // 32
    per_piece = -(-blocks // ALL_REDUCE_PIECES)
    pieces = [min(per_piece, blocks - i * per_piece) * 34 for i in range(-(-blocks // per_piece))]
    headers = WIRE_OVERHEAD - 16
    link_ms = [(nodes - 1) * (b + headers + (16 if i == len(pieces) - 1 else 0)) * bit_ms for i, b in enumerate(pieces)]
    dram_ms = 1e3 / (PI5_DRAM_GBS * 1e9)
    o_proj = matrix_bytes(c, c.dim, c.q_dim // nodes) * dram_ms
    down = c.n_active_experts * matrix_bytes(c, c.dim, c.moe_hidden_dim // nodes) * dram_ms
    per_layer = 2 * DELAY_MS + exposed_piece_ms(o_proj, link_ms) + exposed_piece_ms(down, link_ms)
    return c.n_layers * per_layer + 2 * DELAY_MS + (nodes - 1) * (520 + WIRE_OVERHEAD) * bit_ms


def print_projection(sync: dict[int, dict[str, float]]) -> None:
    """sync: per node count, the sync-only run's figures at 48 layers: decode_ms and kb per
    decode token, prefill_ms per prompt token."""
    from bench import decode_bytes_per_step, matrix_bytes
    from bench_neon import CPUS, GROUP_BLOCK_BYTES, analyse, batch_of

    c = qwen3_30b_a3b()
    neon = analyse([])
    cpu = CPUS[0]  # neoverse-n1: the A76's pipelines (bench_neon.py)
    decode_cycles = neon.readings[neon.decode, cpu].cycles
    prefill_cycles = neon.readings[neon.prefill, cpu].cycles / batch_of(neon.prefill)
    core_gbs = GROUP_BLOCK_BYTES * PI5_GHZ / decode_cycles

    embedding = c.vocab_size * c.dim * 4
    matrices = c.n_layers * (matrix_bytes(c, c.q_dim, c.dim) + 2 * matrix_bytes(c, c.kv_dim, c.dim)
                             + matrix_bytes(c, c.dim, c.q_dim) + c.n_experts * c.dim * 4
                             + c.n_experts * 3 * matrix_bytes(c, c.moe_hidden_dim, c.dim)) + matrix_bytes(c, c.vocab_size, c.dim)
    per_token = decode_bytes_per_step(c)  # the weights one decode token reads, whole model
    q40_per_token = per_token - c.n_experts * c.dim * 4 * c.n_layers  # less the F32 router
    print()
    print(f"Pi 5 projection: Qwen3-30B-A3B Q40 ({c.n_layers} layers), Pi 5 8 GB nodes")
    print(f"  inputs: {PI5_CORES} x A76 at {PI5_GHZ} GHz; DRAM {PI5_DRAM_GBS} GB/s per node (issue #17, low end);")
    print(f"  NEON decode {decode_cycles:.2f} cycles per 144-byte group-block = {core_gbs:.2f} GB/s per core, "
          f"prefill {prefill_cycles:.2f} cycles per group-block per token (llvm-mca-19 {cpu}, make bench-neon);")
    print(f"  sync per token: floor = the mesh all-reduce's bytes on a {LINK_GBIT} Gbit/s link plus one "
          f"{DELAY_MS} ms one-way delay each ({2 * c.n_layers} a token, + the step and the replies); overlapped = the "
          f"floor with each partial sent in {ALL_REDUCE_PIECES} pieces while its matmul (o_proj, the experts' down "
          f"projections: DRAM at {PI5_DRAM_GBS} GB/s) runs; measured = the sync-only run of make bench-cluster, "
          f"scaled to {c.n_layers} layers;")
    print(f"  weights read per decode token {per_token / 1e9:.2f} GB (bench.py decode_bytes_per_step); "
          f"engine {ENGINE_GB} GB per node (assumed); prefill of {PREFILL_TOKENS}-token prompts")
    print(f"  {'nodes':>5} {'weights':>7} {'embed':>5} {'KV':>5} {'total GB':>8} {'DRAM ms':>7} {'kernel ms':>9} "
          f"{'sync floor':>10} {'overlapped':>10} {'decode tok/s':>12} {'prefill tok/s':>13} {'sync measured':>13} {'decode tok/s':>12} "
          f"{'KB/tok':>6}")
    for n in NODES:
        kv_heads = -(-c.n_kv_heads // n)  # a node keeps whole kv heads
        kv = 2 * c.n_layers * KV_POSITIONS * kv_heads * c.head_dim * 4
        total = matrices / n + embedding + kv + ENGINE_GB * 1e9
        dram_ms = per_token / n / (PI5_DRAM_GBS * 1e9) * 1e3
        kernel_ms = per_token / n / (core_gbs * PI5_CORES * 1e9) * 1e3
        step_ms = max(dram_ms, kernel_ms)
        floor = network_floor_ms(c, n, 1)
        overlapped = overlapped_floor_ms(c, n)
        prefill_ms = (q40_per_token / n / GROUP_BLOCK_BYTES * prefill_cycles / (PI5_CORES * PI5_GHZ * 1e6)
                      + network_floor_ms(c, n, PREFILL_TOKENS) / PREFILL_TOKENS)
        measured = sync.get(n)
        tail = (f"{measured['decode_ms']:13.2f} {1e3 / (step_ms + measured['decode_ms']):12.2f} {measured['kb']:6.0f}"
                if measured else f"{'-':>13} {'-':>12} {'-':>6}")
        fits = "" if total <= PI5_RAM_GB * 1e9 else "  (does not fit 8 GB)"
        print(f"  {n:5d} {matrices / n / 1e9:7.2f} {embedding / 1e9:5.2f} {kv / 1e9:5.2f} {total / 1e9:8.2f} "
              f"{dram_ms:7.2f} {kernel_ms:9.2f} {floor:10.2f} {overlapped:10.2f} {1e3 / (step_ms + overlapped):12.2f} "
              f"{1e3 / prefill_ms:13.1f} "
              f"{tail}{fits}")
    r = REFERENCE
    print(f"  reference, Distributed Llama on {r['nodes']} x Pi 5 (issue #17): decode {r['decode_tok_s']} tok/s, "
          f"prefill {r['prefill_tok_s']} tok/s, {r['sent_kb']} KB sent and {r['sync_ms']} ms sync per token")


if __name__ == "__main__":
    print_projection({})  # the floor alone
