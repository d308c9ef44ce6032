"""The tensor table (dllama.tensors): the layout it gives a file and the parts it gives each node."""
from __future__ import annotations

import pytest

from dllama.cluster.plan import plan_slices
from dllama.config import Arch, FloatType, ModelConfig
from dllama.tensors import KINDS, Follows, Scope, Split, held_part, layout_nbytes, tensor_count, tensor_layout


def config(arch: Arch, weight_type: FloatType = FloatType.Q40) -> ModelConfig:
    moe = dict(n_experts=4, n_active_experts=2, moe_hidden_dim=64) if arch == Arch.QWEN3_MOE else {}
    return ModelConfig(arch=arch, dim=128, hidden_dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32,
                       vocab_size=100, seq_len=64, weight_type=weight_type, **moe)


@pytest.mark.parametrize("arch", list(Arch))
def test_the_layout_lists_each_kind_the_model_has_once_per_layer_and_expert(arch):
    c = config(arch)
    layout = tensor_layout(c)
    layers = range(c.n_layers)
    for kind in KINDS:
        specs = [t for t in layout if t.kind is kind]
        if not kind.when(c):
            assert not specs, kind.core
            continue
        want = {Scope.MODEL: [(None, None)], Scope.LAYER: [(layer, None) for layer in layers],
                Scope.EXPERT: [(layer, e) for layer in layers for e in range(c.n_experts)]}[kind.scope]
        assert [(t.layer, t.expert) for t in specs] == want, kind.core
        for t in specs:
            prefix = "" if t.layer is None else f"layers.{t.layer}." + ("" if t.expert is None else f"experts.{t.expert}.")
            assert (t.name, t.shape, t.type) == (prefix + kind.name, kind.shape(c), kind.type(c))
    assert tensor_count(c) == len(layout)
    assert layout_nbytes(c) == sum(t.nbytes for t in layout)


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("nodes", [1, 2, 3, 8])
def test_the_nodes_parts_of_every_tensor_cover_it_along_its_split(arch, nodes):
    """Rows or columns of a split tensor: the nodes' parts side by side, covering it (kv heads:
    together covering it, nodes that share one each holding a copy); the rest whole on every node."""
    c = config(arch, FloatType.F32)
    plan = plan_slices(c, [1.0] * nodes)
    for kind in (k for k in KINDS if k.when(c)):
        shape = kind.shape(c)
        full = ((0, shape[0] if len(shape) == 2 else 1), (0, shape[-1]))
        parts = [held_part(kind, c, node) for node in plan]
        if kind.split is Split.NONE:
            assert parts == [full] * nodes, kind.core
            continue
        axis = 0 if kind.split is Split.ROWS else 1
        assert all(p[1 - axis] == full[1 - axis] for p in parts), kind.core
        ranges = [p[axis] for p in parts]
        if kind.follows is Follows.KV_HEADS:
            held = set().union(*(range(*r) for r in ranges))
            assert held == set(range(full[axis][1])), kind.core
        else:
            assert ranges[0][0] == 0 and ranges[-1][1] == full[axis][1], kind.core
            assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:])), kind.core
