"""The native core's typed interface: the model's shape, a node's slice and its weights as
dllama.native hands them over, bound by the kinds of the tensor table; and the stub, _core.pyi,
against what the extension exports."""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from dllama import _core
from dllama.cluster.footprint import node_slices
from dllama.cluster.plan import NodeSlice, plan_slices
from dllama.config import Arch, FloatType, ModelConfig, RopeType
from dllama.native import bind_tensor, native_config, native_plan
from dllama.tensors import KINDS, layout_nbytes

STUB = Path(__file__).resolve().parents[1] / "engine" / "dllama" / "_core.pyi"


def config(arch: Arch, weight_type: FloatType = FloatType.Q40, **kw) -> ModelConfig:
    moe = dict(n_experts=4, n_active_experts=2, moe_hidden_dim=96) if arch == Arch.QWEN3_MOE else {}
    return ModelConfig(**{**dict(arch=arch, dim=128, hidden_dim=256, n_layers=2, n_heads=8, n_kv_heads=2,
                                 head_dim=32, vocab_size=96, seq_len=64, weight_type=weight_type), **moe, **kw})


def node_core(c: ModelConfig, node: NodeSlice | None = None, skip: str | None = None,
              max_sequences: int = 1) -> _core.Transformer:
    """A core bound from a file's worth of small values (no file: the slices the table gives a
    node, placed in one buffer as in a .m file), leaving out the tensor named `skip`."""
    node = node or plan_slices(c, [1.0])[0]
    rng = np.random.default_rng(0)
    buffer = rng.integers(0, 16, layout_nbytes(c), dtype=np.uint8)  # Q40: small scales and nibbles
    if c.weight_type == FloatType.F32:
        buffer = (rng.standard_normal(layout_nbytes(c) // 4, dtype=np.float32) * 0.05).view(np.uint8)
    core = _core.Transformer(native_config(c), native_plan(node), nthreads=2, max_seq_len=16, max_batch=4,
                             max_sequences=max_sequences)
    for t in node_slices(c, node):
        if t.name != skip:
            bind_tensor(core, t, buffer, t.offset, t.row_stride)
    return core


def test_every_kind_of_the_table_is_a_weight_the_core_reads():
    assert [k.core for k in KINDS] == list(_core.TensorKind.__members__)


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("weight_type", [FloatType.F32, FloatType.Q40])
def test_every_node_binds_what_the_table_gives_it_and_runs(arch, weight_type):
    c = config(arch, weight_type)
    for node in plan_slices(c, [1.0, 2.0, 1.0]) + plan_slices(c, [1.0]):
        core = node_core(c, node)
        core.check_bound()
        logits = core.forward([1, 2, 3, 4, 5], 0)
        assert logits.shape == (node.vocab[1] - node.vocab[0],) and np.isfinite(logits).all()


def test_the_core_refuses_a_weight_the_table_does_not_give():
    c = config(Arch.QWEN3_MOE)
    core = node_core(c)
    buffer = np.zeros(1 << 20, dtype=np.uint8)
    with pytest.raises(ValueError, match="this model has no GATE weight"):  # dense FFN in a MoE model
        core.bind(_core.TensorKind.GATE, 0, 0, buffer, 0, 256, 128, 72, _core.FloatType.Q40)
    with pytest.raises(ValueError, match=r"layer 2 is not in 0\.\.1"):
        core.bind(_core.TensorKind.WQ, 2, 0, buffer, 0, 256, 128, 72, _core.FloatType.Q40)
    with pytest.raises(ValueError, match=r"expert 4 is not in 0\.\.3"):
        core.bind(_core.TensorKind.EXPERT_UP, 1, 4, buffer, 0, 96, 128, 72, _core.FloatType.Q40)
    with pytest.raises(ValueError, match=r"unexpected float type 0"):
        core.bind(_core.TensorKind.WQ, 1, 0, buffer, 0, 256, 128, 512, _core.FloatType.F32)
    q = next(t for t in node_slices(c, plan_slices(c, [1.0])[0]) if t.name == "layers.1.q_proj")
    wrong = dataclasses.replace(q, rows=q.rows - 8)
    with pytest.raises(ValueError, match=r"tensor layers\.1\.q_proj: expected shape \[256, 128\], got \[248, 128\]"):
        bind_tensor(core, wrong, buffer, 0, wrong.row_bytes)
    with pytest.raises(ValueError, match=r"tensor layers\.1\.q_proj: needs .* bytes at offset 1040000"):
        bind_tensor(core, q, buffer, 1040000, q.row_bytes)


@pytest.mark.parametrize("skip, named", [
    ("layers.1.experts.3.up_proj", "EXPERT_UP of layer 1 expert 3"),
    ("layers.0.q_norm", "Q_NORM of layer 0"),
    ("lm_head", "LM_HEAD"),
])
def test_check_bound_names_the_weight_left_out(skip, named):
    core = node_core(config(Arch.QWEN3_MOE), skip=skip)
    with pytest.raises(ValueError, match=f"^weight {named} was not bound$"):
        core.check_bound()


def test_the_core_gets_every_field_of_the_config():
    llama = config(Arch.LLAMA, rope_type=RopeType.LLAMA3_1, rope_scaling_factor=8, rope_scaling_low_freq_factor=1,
                   rope_scaling_high_freq_factor=4, rope_scaling_orig_max_seq_len=8192, rope_theta=500000,
                   norm_epsilon=6)
    got = native_config(llama)
    assert (got.arch, got.weight_type, got.rope_style) == (
        _core.Arch.LLAMA, _core.FloatType.Q40, _core.RopeStyle.INTERLEAVED)
    assert (got.dim, got.hidden_dim, got.n_layers, got.n_heads, got.n_kv_heads, got.head_dim, got.vocab_size) == (
        128, 256, 2, 8, 2, 32, 96)
    assert (got.rope_theta, got.rope_scaling_factor, got.rope_scaling_low_freq_factor,
            got.rope_scaling_high_freq_factor, got.rope_scaling_orig_max_seq_len) == (500000.0, 8.0, 1.0, 4.0, 8192)
    assert got.norm_eps == pytest.approx(1e-6)
    moe = native_config(config(Arch.QWEN3_MOE, FloatType.F32, rope_scaling_factor=8))
    assert (moe.arch, moe.weight_type, moe.rope_style) == (
        _core.Arch.QWEN3_MOE, _core.FloatType.F32, _core.RopeStyle.ROTATE_HALF)
    assert (moe.n_experts, moe.n_active_experts, moe.moe_hidden_dim) == (4, 2, 96)
    assert moe.rope_scaling_factor == 0.0  # scaling only where the rope type asks for it


@pytest.mark.parametrize("change, message", [
    (dict(kv_heads=(0, 2)), "kv heads must be exactly those its query heads read"),
    (dict(q_heads=(4, 9)), r"bad range for q_heads \[4, 9\) of 8"),
    (dict(moe=(0, 0)), r"bad range for moe \[0, 0\) of 96"),  # the experts' rows this node computes
    (dict(vocab=(50, 40)), r"bad range for vocab \[50, 40\) of 96"),
])
def test_the_core_refuses_a_slice_that_does_not_fit_the_model(change, message):
    c = config(Arch.QWEN3_MOE)
    node = dataclasses.replace(plan_slices(c, [1.0, 1.0])[1], **change)
    assert native_plan(node).kv_heads == node.kv_heads
    with pytest.raises(ValueError, match=message):
        _core.Transformer(native_config(c), native_plan(node))


def test_a_step_names_what_its_arrays_get_wrong():
    core = node_core(config(Arch.QWEN3))
    NONE, TOPK = int(_core.StepOutput.NONE), int(_core.StepOutput.TOPK)

    def step(seqs=(0,), positions=(0,), counts=(1,), tokens=(1,), outputs=(TOPK,), temperatures=(1.0,)):
        return core.step(*(np.asarray(a) for a in (seqs, positions, counts, tokens, outputs)),
                         np.asarray(temperatures, dtype=np.float32))

    with pytest.raises(ValueError, match="one value per entry"):
        step(seqs=(0, 1))
    with pytest.raises(ValueError, match="add up to the tokens"):
        step(counts=(2,))
    with pytest.raises(ValueError, match="output must be NONE, LOGITS or TOPK"):
        step(outputs=(7,))
    with pytest.raises(ValueError, match="temperature"):
        step(temperatures=(float("nan"),))
    with pytest.raises(ValueError, match="sequence 1 is not in 0..0"):
        step(seqs=(1,))
    with pytest.raises(ValueError, match="appears twice"):
        node_core(config(Arch.QWEN3), max_sequences=2).step(
            np.array([0, 0]), np.array([0, 0]), np.array([1, 1]), np.array([1, 2]), np.array([NONE, NONE]),
            np.array([1, 1], dtype=np.float32))
    # one node alone answers a TOPK entry with one part: its own top 64 over the whole vocabulary
    [(ids, logits, log_norm)] = step()[0]
    assert len(ids) == len(logits) == min(64, config(Arch.QWEN3).vocab_size) and np.isfinite(log_norm)


# -- the stub ----------------------------------------------------------------------------------

def _stub() -> dict[str, ast.AST]:
    """Every public function, class and constant (an annotated name) the stub declares."""
    out: dict[str, ast.AST] = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return {name: node for name, node in out.items() if not name.startswith("_")}


def _parameters(stub: ast.FunctionDef) -> list[str]:
    args = stub.args
    return [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg != "self"]


def _runtime_parameters(function) -> list[str]:
    """The parameter names pybind11 writes into the first line of a function's docstring."""
    inside = re.match(r"\w+\((.*)\) ->", function.__doc__.splitlines()[0]).group(1)
    return [p for p in re.findall(r"(?:^|, )\*?(\w+):", inside) if p != "self"]


def test_the_stub_names_everything_the_core_exports_and_nothing_else():
    exported = {name for name in dir(_core) if not name.startswith("_")}
    assert set(_stub()) == exported


def _members(cls: ast.ClassDef) -> dict[str, ast.AST]:
    """A stub class's methods and properties (FunctionDef) and annotated names (an enum's values)."""
    out: dict[str, ast.AST] = {}
    for m in cls.body:
        if isinstance(m, ast.FunctionDef):
            out[m.name] = m
        elif isinstance(m, ast.AnnAssign) and isinstance(m.target, ast.Name):
            out[m.target.id] = m
    return out


def _is_property(stub: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in stub.decorator_list)


def test_the_stub_gives_every_class_the_cores_members_and_every_function_its_parameters():
    for name, node in _stub().items():
        runtime = getattr(_core, name)
        if isinstance(node, ast.FunctionDef):
            assert _parameters(node) == _runtime_parameters(runtime), name
            continue
        if isinstance(node, ast.AnnAssign):  # a constant: its type
            assert type(runtime).__name__ == ast.unparse(node.annotation), name
            continue
        members = _members(node)
        if hasattr(runtime, "__members__"):  # an enum: its values
            assert set(members) == set(runtime.__members__), name
            continue
        assert {m for m in members if not m.startswith("_")} == {m for m in vars(runtime) if not m.startswith("_")}, name
        for member, stub in members.items():
            if isinstance(stub, ast.FunctionDef) and not _is_property(stub):
                assert _parameters(stub) == _runtime_parameters(getattr(runtime, member)), f"{name}.{member}"
