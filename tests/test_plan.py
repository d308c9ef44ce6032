"""The slice plan: every sharded dimension covered exactly once, blocks of 32 whole, shares
following node weights, kv heads copied where nodes outnumber them."""
from __future__ import annotations

import pytest

from dllama.cluster.plan import plan_slices, split
from dllama.cluster.root import WorkerAddress
from dllama.config import Arch, FloatType, ModelConfig

QWEN3_30B = ModelConfig(arch=Arch.QWEN3_MOE, dim=2048, hidden_dim=6144, n_layers=48, n_heads=32, n_kv_heads=4,
                        vocab_size=151936, seq_len=40960, n_experts=128, n_active_experts=8, moe_hidden_dim=768,
                        head_dim=128, weight_type=FloatType.Q40)


def covers(ranges, total):
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(r[1] > r[0] for r in ranges)


@pytest.mark.parametrize("nodes", range(1, 9))
def test_every_node_count_from_1_to_8_covers_every_dimension(nodes):
    plan = plan_slices(QWEN3_30B, [1.0] * nodes)
    covers([p.q_heads for p in plan], 32)
    covers([p.moe for p in plan], 768)
    covers([p.vocab for p in plan], 151936)
    assert all((p.moe[1] - p.moe[0]) % 32 == 0 for p in plan)
    group = 32 // 4
    for p in plan:
        assert p.kv_heads == (p.q_heads[0] // group, (p.q_heads[1] - 1) // group + 1)


def test_more_nodes_than_kv_heads_share_copies():
    plan = plan_slices(QWEN3_30B, [1.0] * 8)  # 8 nodes, 4 kv heads: two nodes per kv head
    assert [p.kv_heads for p in plan] == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (3, 4), (3, 4)]


def test_weights_make_shares_proportional():
    plan = plan_slices(QWEN3_30B, [1.0, 2.0, 1.0])
    heads = [p.q_heads[1] - p.q_heads[0] for p in plan]
    moe = [p.moe[1] - p.moe[0] for p in plan]
    assert heads == [8, 16, 8]
    assert moe == [192, 384, 192]


def test_uneven_splits_keep_blocks_whole():
    assert split(768, [1.0] * 5, 32) == [(0, 160), (160, 320), (320, 448), (448, 608), (608, 768)]
    with pytest.raises(ValueError, match="whole blocks"):
        split(64, [1.0] * 3, 32)


def test_too_many_nodes_is_a_clear_error():
    with pytest.raises(ValueError, match="at most 32"):
        plan_slices(QWEN3_30B, [1.0] * 33)


@pytest.mark.parametrize("text, host, port, weight", [
    ("10.0.0.1:9999", "10.0.0.1", 9999, 1.0),
    ("node3:9999@2", "node3", 9999, 2.0),
    ("[::1]:9998@0.5", "::1", 9998, 0.5),
])
def test_worker_addresses(text, host, port, weight):
    assert WorkerAddress.parse(text) == WorkerAddress(host, port, weight)


@pytest.mark.parametrize("text", ["10.0.0.1", ":9999", "host:0", "host:70000", "host:99@0", "host:99@x"])
def test_bad_worker_addresses(text):
    with pytest.raises(ValueError, match="host:port"):
        WorkerAddress.parse(text)
