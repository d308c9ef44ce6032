"""The mixed cluster computes what one node computes: the root (x86_64) with every worker, the
arm64 one included, against the root alone, on the same prompt. Run by the e2e harness while
dllama-api is stopped (a worker serves one root at a time); it starts the API again at the end.

F32 buffers: the logits of the prompt and of the next steps agree within 1e-4 of their range.
Q80 buffers: `dllama inference` prints the same greedy text with and without the workers."""

import json

import pytest
from infra_hosts import hosts

testinfra_hosts = hosts("root")

PROMPT = "Hello, world! 안녕하세요. def main():"
STEPS = 12
WORKER_PORT = 9999  # roles/worker's default, which the e2e inventory keeps
KEY = "/etc/dllama/cluster.key"

# Greedy steps through the engine on the node, printing the logits of each step as JSON.
LOGITS = """
import json, sys
import numpy as np
from dllama.engine import Engine
from dllama.tokenizer import Tokenizer
model, tokenizer, key, steps, *workers = sys.argv[1:]
ids = Tokenizer.load(tokenizer).encode(%r)
with Engine(model, nthreads=1, max_seq_len=64, buffer_float_type="f32", workers=workers,
            cluster_key_file=key if workers else None, progress=False) as engine:
    logits, out = engine.forward(ids), []
    for _ in range(int(steps)):
        out.append(logits.tolist())
        logits = engine.forward([int(np.argmax(logits))])
print(json.dumps(out))
""" % PROMPT


@pytest.fixture(scope="module")
def api_stopped(host):
    host.run_expect([0], "systemctl stop dllama-api")
    yield
    host.run_expect([0], "systemctl start dllama-api")


@pytest.fixture(scope="module")
def workers(cluster):
    addresses = [f"{n['address']}:{WORKER_PORT}" for n in cluster.values() if "workers" in n["groups"]]
    assert len(addresses) >= 2
    return addresses


def logits(host, node, workers):
    out = host.check_output(
        "/opt/dllama/bin/python -c %s %s %s %s %s " + " ".join(["%s"] * len(workers)),
        LOGITS, node["model_path"], node["tokenizer_path"], KEY, str(STEPS), *workers)
    return json.loads(out)


def greedy_text(host, node, workers):
    command = ("/opt/dllama/bin/dllama inference --model %s --tokenizer %s --prompt %s --steps %s"
               " --buffer-float-type q80 --nthreads 1 --max-seq-len 64 --temperature 0")
    args = [node["model_path"], node["tokenizer_path"], PROMPT, str(STEPS)]
    if workers:
        command += " --cluster-key-file %s --workers " + " ".join(["%s"] * len(workers))
        args += [KEY, *workers]
    out = host.check_output(command, *args)
    return out.split("\n\n", 1)[0]  # the text; the run's figures follow a blank line


@pytest.mark.usefixtures("api_stopped")
def test_f32_logits_across_the_mixed_cluster_equal_one_nodes(host, node, workers):
    alone = logits(host, node, [])
    together = logits(host, node, workers)
    assert len(alone) == len(together) == STEPS
    for step, (a, b) in enumerate(zip(alone, together)):
        spread = max(a) - min(a)
        err = max(abs(x - y) for x, y in zip(a, b)) / spread
        assert err <= 1e-4, f"step {step}: max abs error {err:.2e} of the logit range"


@pytest.mark.usefixtures("api_stopped")
def test_q80_greedy_text_across_the_mixed_cluster_equals_one_nodes(host, node, workers):
    alone = greedy_text(host, node, [])
    together = greedy_text(host, node, workers)
    assert alone.startswith(PROMPT) and len(alone) > len(PROMPT)
    assert together == alone
