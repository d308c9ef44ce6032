"""Our converter + Engine against Hugging Face transformers on tiny random checkpoints.

For each checkpoint: a prompt of 10 tokens as one prefill batch, then 8 decode steps feeding the
reference's greedy token, comparing the logits at every step.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dllama import Engine, _core  # noqa: E402
from dllama.convert import convert  # noqa: E402
from dllama.testing.checkpoint import make_checkpoint  # noqa: E402
from q40_numpy import dequantize_q40_numpy  # noqa: E402

PROMPT = [9707, 11, 1879, 0, 151643, 3838, 374, 279, 6722, 315]
DECODE_STEPS = 8

# name -> checkpoint options; together they cover every architecture and the variants the
# converter must handle.
CASES = {
    "qwen3_moe": dict(arch="qwen3_moe"),
    "qwen3_moe_bf16_sharded": dict(arch="qwen3_moe", dtype="bf16", shards=2, seed=7),
    "qwen3_moe_transformers5_config": dict(arch="qwen3_moe", config_style="transformers5", seed=3),
    "qwen3_dense_tied": dict(arch="qwen3", tie=True),
    "qwen3_single_kv_head_head_dim_64": dict(arch="qwen3", kv_heads=1, head_dim=64, seed=5),
    "llama_rope_scaling": dict(arch="llama", rope_scaling=True),
    "llama_f16": dict(arch="llama", dtype="f16", seed=11),
}


def reference_logits(model, prompt: list[int], steps: int, feed: list[int] | None = None):
    """Logits of the prompt's last token and of each decode step, with the tokens fed: the
    reference's greedy choices, or `feed` when given."""
    out, fed = [], []
    with torch.no_grad():
        result = model(torch.tensor([prompt]), use_cache=True)
        cache = result.cache
        logits = result.logits[0, -1].float().numpy()
        out.append(logits)
        for _ in range(steps):
            token = feed[len(fed)] if feed else int(np.argmax(logits))
            fed.append(token)
            result = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = result.cache
            logits = result.logits[0, -1].float().numpy()
            out.append(logits)
    return out, fed


def engine_logits(model_path, prompt: list[int], fed: list[int], nthreads: int = 2) -> list[np.ndarray]:
    with Engine(model_path, nthreads=nthreads, max_seq_len=64) as engine:
        out = [engine.forward(prompt)]
        for token in fed:
            out.append(engine.forward([token]))
        assert engine.position == len(prompt) + len(fed)
    return out


def load_reference(hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    return model


def round_through_q40(model) -> None:
    """Replaces every matrix the .m file stores as Q40 by its Q40 round trip (blocks of 32
    along the input dimension, the last one), leaving the embedding, router and norms."""
    with torch.no_grad():
        if model.config.tie_word_embeddings:
            # the .m file stores the LM head as its own (quantized) copy of the embedding
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        for name, param in model.named_parameters():
            if param.ndim < 2 or "embed_tokens" in name or name.endswith("mlp.gate.weight"):
                continue
            w = param.detach().float().numpy()
            rounded = dequantize_q40_numpy(_core.quantize_q40(np.ascontiguousarray(w)))
            param.copy_(torch.from_numpy(rounded.reshape(w.shape)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf_dir = make_checkpoint(root / "hf", preset="tiny", **CASES[name])
    models = {}
    for weights in ("f32", "q40"):
        models[weights] = root / f"model-{weights}.m"
        convert(hf_dir, models[weights], weights=weights, progress=False)
    return name, hf_dir, models


def test_f32_logits_match_transformers(case):
    name, hf_dir, models = case
    expected, fed = reference_logits(load_reference(hf_dir), PROMPT, DECODE_STEPS)
    got = engine_logits(models["f32"], PROMPT, fed)
    for step, (e, g) in enumerate(zip(expected, got)):
        err = float(np.max(np.abs(e - g)))
        assert err <= 1e-3, f"{name} step {step}: max abs error {err}"


def test_q40_logits_match_transformers_on_rounded_weights(case):
    name, hf_dir, models = case
    reference = load_reference(hf_dir)
    round_through_q40(reference)
    rounded, fed = reference_logits(reference, PROMPT, DECODE_STEPS)
    unrounded, _ = reference_logits(load_reference(hf_dir), PROMPT, DECODE_STEPS, feed=fed)
    got = engine_logits(models["q40"], PROMPT, fed)
    for step, (r, u, g) in enumerate(zip(rounded, unrounded, got)):
        assert cosine(r, g) >= 0.99, f"{name} step {step}: cosine vs rounded reference {cosine(r, g):.4f}"
        top5 = np.argsort(g)[-5:]
        assert int(np.argmax(r)) in top5, f"{name} step {step}: reference top-1 not in our top 5"
        assert cosine(u, g) >= 0.9, f"{name} step {step}: cosine vs float reference {cosine(u, g):.4f}"


def test_generic_kernels_give_the_same_logits(case):
    """The portable kernels and the CPU's fast ones compute the same model (each process picks
    its set once, so the generic run happens in a child process)."""
    import subprocess
    import sys

    name, _, models = case
    code = (
        "import sys, numpy as np; from dllama import Engine, _core\n"
        "e = Engine(sys.argv[1], nthreads=2, max_seq_len=64)\n"
        f"l = e.forward({PROMPT!r}); l2 = e.forward([{PROMPT[0]}])\n"
        "np.save(sys.argv[2], np.stack([l, l2])); print(_core.kernel_name())\n"
    )
    results = {}
    for kernels in ("generic", "auto"):
        path = models["q40"].parent / f"logits-{kernels}.npy"
        env = {k: v for k, v in os.environ.items() if k != "DLLAMA_KERNELS"}
        if kernels != "auto":
            env["DLLAMA_KERNELS"] = kernels
        run = subprocess.run([sys.executable, "-c", code, str(models["q40"]), str(path)],
                             env=env, capture_output=True, text=True, check=True)
        results[kernels] = (run.stdout.strip(), np.load(path))
    assert results["generic"][0] == "generic"
    g, f = results["generic"][1], results["auto"][1]
    for a, b in zip(g, f):
        assert cosine(a, b) >= 0.9999, f"{name}: generic vs {results['auto'][0]} kernels disagree"
