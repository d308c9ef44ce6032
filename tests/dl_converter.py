"""Distributed Llama's own Hugging Face converter, re-implemented from its source as the reference
our `dllama convert` output is compared with byte for byte.

Read from b4rtaz/distributed-llama (converter/convert-hf.py: loadConfig, Processor plan, permute;
converter/writer.py: writeHeader, writeQuantizedQ40Tensor, writeF32Tensor). Its logic is kept
step for step (torch for reading, the same numpy expressions for Q40) and only the per-block
`struct.pack` loop is vectorised, which writes the same bytes. Nothing here comes from dllama.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

# writer.py: header key numbers; the order of writing is the order of the params dict below.
HEADER_KEYS = {
    "version": 0, "arch_type": 1, "dim": 2, "hidden_dim": 3, "n_layers": 4, "n_heads": 5,
    "n_kv_heads": 6, "n_experts": 7, "n_active_experts": 8, "vocab_size": 9, "max_seq_len": 10,
    "hidden_act": 11, "rope_theta": 12, "weights_float_type": 13, "rope_scaling_factor": 14,
    "rope_scaling_low_freq_factor": 15, "rope_scaling_high_freq_factory": 16,
    "rope_scaling_orig_max_seq_len": 17, "rope_type": 18, "head_dim": 19, "norm_epsilon": 20,
    "moe_hidden_dim": 21,
}
ARCH = {"llama": 0xABCD00, "mistral": 0xABCD00, "qwen3": 0xABCD01, "qwen3_moe": 0xABCD02}
F32, Q40 = 0, 2


def load_config(folder: str | os.PathLike, weights_float_type: int) -> dict:
    """convert-hf.py loadConfig: which keys, in which order, from config.json."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    eps = config.get("rms_norm_eps")
    result = {
        "version": 0,
        "arch_type": ARCH[config["model_type"]],
        "hidden_act": {"gelu": 0, "silu": 1}[config["hidden_act"]],
        "dim": config["hidden_size"],
        "hidden_dim": config["intermediate_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config["num_key_value_heads"],
        "weights_float_type": weights_float_type,
        "max_seq_len": config["max_position_embeddings"],
        "vocab_size": config["vocab_size"],
    }
    n_experts, n_active = config.get("num_experts"), config.get("num_experts_per_tok")
    result["n_experts"] = int(n_experts) if n_experts is not None else 0
    result["n_active_experts"] = int(n_active) if n_active is not None else 0
    if config.get("rope_theta") is not None:
        result["rope_theta"] = int(config["rope_theta"])
    scaling = config.get("rope_scaling")
    if scaling is not None:
        result["rope_scaling_factor"] = int(scaling["factor"])
        result["rope_scaling_low_freq_factor"] = int(scaling["low_freq_factor"])
        result["rope_scaling_high_freq_factory"] = int(scaling["high_freq_factor"])
        result["rope_scaling_orig_max_seq_len"] = int(scaling["original_max_position_embeddings"])
        result["rope_type"] = {"llama3": 2}[scaling["rope_type"]]
    if config.get("head_dim") is not None:
        result["head_dim"] = config["head_dim"]
    if eps is not None:
        result["norm_epsilon"] = {1e-05: 5, 1e-06: 6}[eps]
    if config.get("moe_intermediate_size") is not None:
        result["moe_hidden_dim"] = int(config["moe_intermediate_size"])
    return result


def header(params: dict) -> bytes:
    """writer.py writeHeader: magic, size (counting magic and itself), then the pairs."""
    data = b"".join(struct.pack("ii", HEADER_KEYS[k], v) for k, v in params.items())
    return struct.pack("ii", 0xA00ABCD, 8 + len(data)) + data


def q40(x: np.ndarray) -> bytes:
    """writer.py writeQuantizedQ40Tensor, its numpy expressions as written there."""
    groups = x.astype(np.float32).reshape(-1, 32)
    gmax = np.max(groups, axis=1)
    gmin = np.min(groups, axis=1)
    deltas = np.divide(np.where(-gmin > gmax, gmin, gmax), -8)
    deltas16 = deltas.astype(np.float16)
    with np.errstate(divide="ignore"):
        ids = np.where(deltas != 0, 1.0 / deltas, 0)
    groups = np.add(groups * ids[:, np.newaxis], 8.5)
    groups = np.clip(groups, 0, 15).astype(int)
    combined = (groups[:, :16] & 0xF) | ((groups[:, 16:] & 0xF) << 4)
    out = np.empty((len(groups), 18), np.uint8)
    out[:, :2] = deltas16.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = combined
    return out.tobytes()


def _permute(t, n_heads: int):
    """convert-hf.py permute (rotate-half rows to interleaved, per head)."""
    return t.reshape(n_heads, 2, t.shape[0] // n_heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _plan(p: dict) -> list[tuple[int, str, tuple[str, ...]]]:
    """Processor.__preparePlan: (float type, transform, names tried in turn) in file order."""
    wt, plan = p["weights_float_type"], [(F32, "", ("model.embed_tokens.weight",))]
    for i in range(p["n_layers"]):
        a = f"model.layers.{i}."
        plan += [(wt, "q", (a + "self_attn.q_proj.weight",)), (wt, "k", (a + "self_attn.k_proj.weight",)),
                 (wt, "", (a + "self_attn.v_proj.weight",)), (wt, "", (a + "self_attn.o_proj.weight",))]
        if p["n_experts"] > 0:
            plan.append((F32, "", (a + "mlp.gate.weight",)))
            for e in range(p["n_experts"]):
                plan += [(wt, "", (f"{a}mlp.experts.{e}.{w}.weight",)) for w in ("gate_proj", "down_proj", "up_proj")]
        else:
            plan += [(wt, "", (f"{a}mlp.{w}.weight",)) for w in ("gate_proj", "down_proj", "up_proj")]
        if p["arch_type"] in (ARCH["qwen3"], ARCH["qwen3_moe"]):
            plan += [(F32, "", (a + "self_attn.q_norm.weight",)), (F32, "", (a + "self_attn.k_norm.weight",))]
        plan += [(F32, "", (a + "input_layernorm.weight",)), (F32, "", (a + "post_attention_layernorm.weight",))]
    plan += [(F32, "", ("model.norm.weight",)), (wt, "", ("lm_head.weight", "model.embed_tokens.weight"))]
    return plan


def convert(folder: str | os.PathLike, weights_float_type: int) -> bytes:
    """The whole .m file Distributed Llama's convert-hf.py writes for this checkpoint."""
    import torch  # noqa: F401 - safe_open(framework="pt") needs it
    from safetensors import safe_open

    p = load_config(folder, weights_float_type)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and not f.startswith("."))
    tensors = {}
    for f in files:
        with safe_open(os.path.join(folder, f), framework="pt", device="cpu") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    out = [header(p)]
    for float_type, transform, names in _plan(p):
        t = next(tensors[n] for n in names if n in tensors)
        if transform == "q" and p["arch_type"] == ARCH["llama"]:
            t = _permute(t, p["n_heads"])
        elif transform == "k" and p["arch_type"] == ARCH["llama"]:
            t = _permute(t, p["n_kv_heads"])  # permute(t, nHeads, nKvHeads) uses nKvHeads
        x = t.detach().cpu().view(-1).to(torch.float32).numpy().astype(np.float32)
        out.append(q40(x) if float_type == Q40 else x.astype("<f4").tobytes())
    return b"".join(out)


# -- converter/convert-tokenizer-hf.py (PreTrainedTokenizerFast path) + tokenizer-writer.py ----

def _unicode_to_bytes() -> dict[str, int]:
    """convert-tokenizer-hf.py unicodeToBytes (GPT-2's byte <-> printable character table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip([chr(c) for c in cs], bs))


def tokenizer_file(folder: str | os.PathLike) -> bytes:
    """The dllama_tokenizer_*.t its convert-tokenizer-hf.py writes for a Hugging Face folder."""
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        tk_config = json.load(f)
    utb = _unicode_to_bytes()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    tokens, scores = [], []
    for i in range(len(tokenizer.get_vocab())):
        out = []
        for ch in tokenizer.convert_ids_to_tokens([i])[0]:
            out += [utb[ch]] if ch in utb else list(ch.encode("utf-8"))
        tokens.append(bytes(out))
        scores.append(-float(i))
    bos_id, eos_ids = tokenizer.bos_token_id, [tokenizer.eos_token_id] if tokenizer.eos_token_id else None
    if bos_id is None or eos_ids is None:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        bos_id = config["bos_token_id"] if bos_id is None else bos_id
        if eos_ids is None:
            eos = config["eos_token_id"]
            eos_ids = eos if isinstance(eos, list) else [eos]
    template = tk_config["chat_template"].encode("utf-8") if "chat_template" in tk_config else None
    add_bos = tk_config.get("add_bos_token", True)
    # tokenizer-writer.py writeTokenizer
    params = {"bos_id": bos_id, "version": 1, "vocab_size": len(tokens), "max_token_length": max(map(len, tokens))}
    if template:
        params["chat_template"] = len(template)
    params["n_eos_tokens"] = len(eos_ids)
    params["add_bos"] = 1 if add_bos else 0
    keys = {"version": 0, "vocab_size": 1, "max_token_length": 2, "bos_id": 3, "chat_template": 7,
            "n_eos_tokens": 9, "add_bos": 10}
    data = b"".join(struct.pack("ii", keys[k], v) for k, v in params.items() if v is not None)
    out = [struct.pack("i", 0x567124), struct.pack("i", 8 + len(data)), data, template or b""]
    out += [struct.pack("i", e) for e in eos_ids]
    out += [struct.pack("fI", s, len(t)) + t for t, s in zip(tokens, scores)]
    return b"".join(out)
