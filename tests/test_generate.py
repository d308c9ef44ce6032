"""The generation loop's stopping rules and figures on a tiny random Qwen3-MoE: the tokens are what
greedy decoding with engine.forward and argmax gives (tests/greedy_reference.py), the positions
what the engine reports, and what is fed what Generation.entry() hands the engine."""
from __future__ import annotations

import numpy as np
import pytest
from cluster_helpers import Workers
from greedy_reference import eos_at, greedy

from dllama import Engine
from dllama.engine import LOGITS, NONE, TOPK, Entry
from dllama.generate import Generation, GenerationResult, PrefixCache, format_stats, generate
from dllama.sampler import Sampler
from dllama.testing import qwen3_tokenizer_dir
from dllama.testing.checkpoint import make_model_file
from dllama.tokenizer import Tokenizer

PROMPT = [151644, 872, 198, 9707, 11, 1879, 0, 151645]
CONTEXT = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # f32 weights: a q40 tiny MoE has one block of expert rows, too few to split between two nodes
    return make_model_file(tmp_path_factory.mktemp("generate") / "tiny.m", preset="tiny", arch="qwen3_moe",
                           weights="f32", seed=5)


@pytest.fixture(scope="module")
def shared_engine(model):
    with Engine(model, nthreads=1, max_seq_len=CONTEXT) as e:
        yield e


@pytest.fixture
def engine(shared_engine):
    shared_engine.reset()
    return shared_engine


@pytest.fixture(scope="module")
def reference(shared_engine) -> list[int]:
    """PROMPT's greedy continuation until the context is full."""
    shared_engine.reset()
    return greedy(shared_engine, PROMPT, CONTEXT)


def run(engine: Engine, prompt: list[int], steps: int = 100, eos: set[int] = frozenset(), **kwargs) -> GenerationResult:
    return generate(engine, prompt, steps=steps, sampler=Sampler(temperature=0), eos_ids=eos, **kwargs)


def drive(engine: Engine, g: Generation, **advance) -> list[tuple[int, list[int], object, object]]:
    """Runs g alone; per step: the engine's position before it, the tokens fed, the output asked
    for, what advance() yielded."""
    steps = []
    while not g.done:
        position, entry = engine.position, g.entry()
        steps.append((position, list(entry.tokens), entry.output, g.advance(engine.step([entry])[0], **advance)))
    return steps


def test_the_reference_fills_the_context(reference) -> None:
    assert len(reference) == CONTEXT - len(PROMPT) + 1  # the last one comes from the last position's logits
    assert len(set(reference)) > 1, "a random model that repeats one token tests little"


def test_prompt_in_one_step_then_one_step_per_token(engine, reference) -> None:
    eos, stop = eos_at(reference, 4)
    seen: list[int] = []
    g = Generation(PROMPT, seq=0, start=0, max_seq_len=CONTEXT, steps=100, sampler=Sampler(temperature=0),
                   eos_ids={eos}, on_token=seen.append)
    steps = drive(engine, g)
    assert steps[0] == (0, PROMPT, TOPK, reference[0] if stop else None)
    fed_tokens = [(position, tokens, output) for position, tokens, output, _ in steps[1:]]
    assert fed_tokens == [(len(PROMPT) + i, [t], TOPK) for i, t in enumerate(reference[:stop])]
    assert [y for *_, y in steps] == reference[:stop] + [None]  # the eos is not yielded
    assert g.tokens == seen == reference[:stop]
    assert g.fed == PROMPT + reference[:stop]
    result = g.result()
    assert (result.finish_reason, result.prefill_tokens, result.decode_tokens) == ("stop", len(PROMPT), stop)
    assert engine.position == len(PROMPT) + stop


def test_generate_stops_at_an_eos(engine, reference) -> None:
    eos, stop = eos_at(reference, 5)
    result = run(engine, PROMPT, eos={eos})
    assert result.tokens == reference[:stop]
    assert result.finish_reason == "stop"
    assert engine.position == len(PROMPT) + stop  # every yielded token fed, the eos not


def test_eos_right_after_the_prompt(engine, reference) -> None:
    result = run(engine, PROMPT, eos={reference[0]})
    assert result.tokens == [] and result.finish_reason == "stop"
    assert result.decode_tokens == 0
    assert engine.position == len(PROMPT)


def test_steps_limit_generated_tokens(engine, reference) -> None:
    result = run(engine, PROMPT, steps=3)
    assert result.tokens == reference[:3]
    assert result.finish_reason == "length"
    assert engine.position == len(PROMPT) + 2  # the last token is returned, never fed


def test_zero_steps_feeds_the_prompt_only(engine) -> None:
    g = Generation(PROMPT, seq=0, start=0, max_seq_len=CONTEXT, steps=0, sampler=Sampler(temperature=0), eos_ids=())
    assert drive(engine, g) == [(0, PROMPT, NONE, None)]  # no candidates asked for: nothing is sampled
    assert g.result().tokens == [] and engine.position == len(PROMPT)
    engine.reset()
    assert run(engine, PROMPT, steps=0).tokens == [] and engine.position == len(PROMPT)


def test_stops_when_the_context_is_full(engine, reference) -> None:
    result = run(engine, PROMPT)
    assert result.tokens == reference
    assert result.finish_reason == "length"
    assert engine.position == CONTEXT


def test_prompt_that_does_not_fit(engine) -> None:
    engine.forward(PROMPT * 2)
    with pytest.raises(ValueError, match="does not fit"):
        run(engine, PROMPT + [1])  # 16 + 9 positions of 24
    with pytest.raises(ValueError, match="empty"):
        run(engine, [])
    with pytest.raises(ValueError, match="steps"):
        run(engine, [1], steps=-1)
    assert engine.position == 2 * len(PROMPT)  # nothing was fed
    assert run(engine, PROMPT).tokens  # exactly the rest of the context: fits, and yields one token
    assert engine.position == CONTEXT


def test_continues_from_the_current_position(engine, reference) -> None:
    eos, stop = eos_at(reference, 3)
    follow = [eos, 198]  # the next turn: only the tokens the engine has not seen
    assert greedy(engine, PROMPT, stop + 1, eos={eos}) == reference[:stop]  # the same steps as the first run
    expected = greedy(engine, follow, 4)

    engine.reset()
    assert run(engine, PROMPT, eos={eos}).tokens == reference[:stop]
    assert engine.position == len(PROMPT) + stop
    result = run(engine, follow, steps=4)
    assert result.tokens == expected
    assert result.prefill_tokens == len(follow)
    assert engine.position == len(PROMPT) + stop + len(follow) + 3


def test_prompt_in_chunks_of_a_budget(engine) -> None:
    g = Generation(PROMPT, seq=0, start=0, max_seq_len=CONTEXT, steps=2, sampler=Sampler(temperature=0), eos_ids=())
    chunks = []
    while g.prefilling:
        entry = g.entry(budget=3)
        chunks.append((list(entry.tokens), entry.output))
        result = engine.step([entry])[0]
        left = g.prompt_left
        yielded = g.advance(result)
        assert g.prompt_left == left - len(entry.tokens)
    assert chunks == [(PROMPT[:3], NONE), (PROMPT[3:6], NONE), (PROMPT[6:], TOPK)]
    assert yielded == g.tokens[0] and engine.position == len(PROMPT)
    # the same chunks asking for the last one's logits: its argmax is what was sampled
    engine.reset()
    engine.step([Entry(0, PROMPT[:3])])
    engine.step([Entry(0, PROMPT[3:6])])
    assert int(np.argmax(engine.step([Entry(0, PROMPT[6:], LOGITS)])[0])) == yielded
    assert g.entry().tokens == [yielded]  # then it decodes the token it sampled


def test_another_sequence_slot(model, reference) -> None:
    with Engine(model, nthreads=1, max_seq_len=CONTEXT, max_sequences=3) as engine:
        result = run(engine, PROMPT, steps=4, seq=2)
        assert result.tokens == reference[:4]
        assert [engine.position_of(s) for s in range(3)] == [0, 0, len(PROMPT) + 3]


def test_text_with_a_tokenizer(engine, reference) -> None:
    tokenizer = Tokenizer.load(qwen3_tokenizer_dir())
    result = run(engine, PROMPT, steps=6, tokenizer=tokenizer)
    assert result.text == tokenizer.decode(reference[:6])


def test_prefix_cache_keeps_the_common_prefix(engine, reference) -> None:
    cache = PrefixCache(seq=0)
    assert cache.reuse(engine, PROMPT) == 0
    result = run(engine, PROMPT, steps=3)
    cache.record(engine, PROMPT + result.tokens)
    assert cache.tokens == PROMPT + reference[:2]  # the last token was never fed
    again = PROMPT + reference[:1] + [reference[1] ^ 1, 8]  # departs after the first generated token
    assert cache.reuse(engine, again) == len(PROMPT) + 1
    assert engine.position == len(PROMPT) + 1
    assert cache.reuse(engine, PROMPT) == len(PROMPT) - 1  # one prompt token is always fed: its logits
    engine.forward([5, 6])  # someone else moved the sequence: nothing it holds is known any more
    assert cache.reuse(engine, PROMPT) == 0 and engine.position == 0


# the figures


def test_rates() -> None:
    result = GenerationResult([1] * 8, "stop", prefill_tokens=10, prefill_seconds=0.5, decode_tokens=8, decode_seconds=2.0)
    assert result.prefill_tokens_per_second == pytest.approx(20.0)
    assert result.prefill_ms_per_token == pytest.approx(50.0)
    assert result.decode_tokens_per_second == pytest.approx(4.0)
    assert result.decode_ms_per_token == pytest.approx(250.0)
    empty = GenerationResult([], "stop", 1, 0.1, 0, 0.0)
    assert empty.decode_tokens_per_second == 0.0 and empty.decode_ms_per_token == 0.0


def test_format_stats_single_node() -> None:
    result = GenerationResult([1] * 8, "stop", prefill_tokens=10, prefill_seconds=0.5, decode_tokens=8, decode_seconds=2.0)
    assert format_stats(result) == (
        "Evaluation\n"
        "    nTokens: 10\n"
        "   tokens/s: 20.00 (50.00 ms/tok)\n"
        "Prediction\n"
        "    nTokens: 8\n"
        "   tokens/s: 4.00 (250.00 ms/tok)"
    )


def test_a_single_node_run_has_no_network_figures(engine) -> None:
    result = run(engine, PROMPT, steps=5)
    assert (result.prefill_net, result.decode_net) == ({}, {})
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    text = format_stats(result)
    assert text.startswith(f"Evaluation\n    nTokens: {len(PROMPT)}\n")
    assert "Prediction\n    nTokens: 4\n" in text  # the prompt's step sampled the first token
    assert "sync:" not in text and "sent:" not in text


def test_network_figures_per_token_on_a_cluster(model) -> None:
    with Workers(1) as workers, Engine(model, nthreads=1, max_seq_len=CONTEXT, workers=workers.addresses,
                                       progress=False) as engine:
        g = Generation(PROMPT, seq=0, start=0, max_seq_len=CONTEXT, steps=4, sampler=Sampler(temperature=0),
                       eos_ids=())
        per_step = []  # (prefill?, the step's figures as the engine measured them)
        while not g.done:
            prefill, out = g.prefilling, engine.step([g.entry()])[0]
            per_step.append((prefill, engine.stats()))
            g.advance(out, 0.01, per_step[-1][1])
    result = g.result()
    assert [p for p, _ in per_step] == [True, False, False, False]
    prefill, decode = per_step[0][1], [s for p, s in per_step[1:]]
    for key in ("sync_ms", "sent_kb", "recv_kb"):
        # the prompt's step counts once for all its tokens, each decode step once for its token
        assert result.prefill_net[key] == pytest.approx(prefill[key] / len(PROMPT))
        assert result.decode_net[key] == pytest.approx(sum(s[key] for s in decode) / 3)
    assert result.decode_net["sent_kb"] > 0 and result.decode_net["recv_kb"] > 0
    text = format_stats(result)
    assert f"       sent: {result.decode_net['sent_kb']:.1f} kB/tok\n" in text
    assert text.count("sync:") == text.count("sent:") == text.count("recv:") == 2
    assert "mac" not in text


def test_partial_network_figures(engine) -> None:
    g = Generation(PROMPT, seq=0, start=0, max_seq_len=CONTEXT, steps=2, sampler=Sampler(temperature=0), eos_ids=())
    drive(engine, g, stats={"sync_ms": 2.0})
    result = g.result()
    assert result.prefill_net == {"sync_ms": pytest.approx(2.0 / len(PROMPT))}
    assert result.decode_net == {"sync_ms": 2.0}
    text = format_stats(result)
    assert "sync:" in text and "sent:" not in text and "recv:" not in text
