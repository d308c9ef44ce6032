"""The model role for real, on this machine over a local connection (a file on the "controller"
copied to a "root node", both in a temporary directory): the model is copied once, the checksum
recorded beside it decides every later run, and a run that changes nothing hashes nothing on
either end (issue 15); then dllama-api's unit, under --check, carries the model's checksum, so a
new model restarts the API. The download path likewise, from an HTTP server on loopback: fetched
once, and again only for a new model_checksum."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from ansible_cli import ROOT, run, tool

CONTROLLER_HASH = "model : Compute the checksum of the model on the controller"
COPY = "model : Copy the model from the controller, unless the node has this version already"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the model role makes its files root's: run as root")
    tmp = tmp_path_factory.mktemp("model")
    src = tmp / "controller"
    (src / "tok").mkdir(parents=True)
    (src / "model.m").write_bytes(os.urandom(1 << 20))
    (src / "tok" / "tokenizer.json").write_text('{"model": {}}\n')
    (src / "tok" / "tokenizer_config.json").write_text("{}\n")
    node = tmp / "node" / "models"
    inventory = {"cluster": {"children": {"root": {"hosts": {"r1": {}}}, "workers": {"hosts": {}}}, "vars": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable, "ansible_become": False,
        "dllama_model_path": str(node / "model.m"), "dllama_tokenizer_path": str(node / "tok"),
        "dllama_model_src": str(src / "model.m"), "dllama_tokenizer_src": str(src / "tok"),
        "model_src_checksum_cache": str(tmp / "cache"),
        "dllama_cluster_key_source": str(tmp / "secrets" / "cluster.key"),
    }}}
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    # the roles find the templates beside the playbook, as beside site.yml
    (tmp / "templates").symlink_to(ROOT / "templates")
    (tmp / "model.yml").write_text(yaml.safe_dump([{"name": "The model on the root", "hosts": "root",
                                                    "gather_facts": False, "roles": ["model"]}]))
    return tmp, src, node


def play(tree, playbook, *args, **env):
    """{task name: [results]} of one ansible-playbook run on r1 (env: more environment variables)."""
    tmp, _, _ = tree
    proc = run(tool("ansible-playbook"), "-i", str(tmp / "hosts.yml"), playbook, *args,
               ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json", **env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    results = {}
    for each in json.loads(proc.stdout)["plays"]:
        for task in each["tasks"]:
            for result in task["hosts"].values():
                results.setdefault(task["task"]["name"], []).append(result)
    return results


def changed(results):
    return sorted(name for name, rs in results.items() if any(r.get("changed") for r in rs))


def ran(results, name):
    return any(not r.get("skipped") for r in results.get(name, []))


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(tree):
    """The role run four times: fresh, again, after a touch of the controller's file, after a new model."""
    tmp, src, _ = tree
    playbook = str(tmp / "model.yml")
    first = play(tree, playbook)
    second = play(tree, playbook)
    stat = (src / "model.m").stat()
    os.utime(src / "model.m", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = play(tree, playbook)
    (src / "model.m").write_bytes(os.urandom(1 << 20))
    new_model = play(tree, playbook)
    return first, second, touched, new_model


def test_a_fresh_node_gets_the_model_and_its_checksum_beside_it(tree, runs):
    _, src, node = tree
    first = runs[0]
    assert ran(first, COPY) and ran(first, CONTROLLER_HASH)
    # (the controller's file has changed since: the last run copied the new one)
    assert sha256(node / "model.m") == sha256(src / "model.m")
    assert (node / "model.m.sha256").read_text() == f"{sha256(src / 'model.m')}  model.m\n"


def test_the_tokenizer_checksums_are_recorded_beside_its_directory(tree, runs):
    _, src, node = tree
    assert (node / "tok.sha256").read_text() == (
        f"{sha256(src / 'tok' / 'tokenizer.json')}  tokenizer.json\n"
        f"{sha256(src / 'tok' / 'tokenizer_config.json')}  tokenizer_config.json\n")


def test_a_second_run_changes_nothing_and_hashes_nothing(runs):
    second = runs[1]
    assert changed(second) == []
    assert not ran(second, COPY)
    assert not ran(second, CONTROLLER_HASH)


def test_a_touched_model_is_hashed_again_on_the_controller_but_not_copied(runs):
    touched = runs[2]
    assert ran(touched, CONTROLLER_HASH)
    assert not ran(touched, COPY)
    assert changed(touched) == []


def test_a_new_model_is_copied_and_recorded(tree, runs):
    _, src, node = tree
    new_model = runs[3]
    assert ran(new_model, COPY)
    assert changed(new_model) == [COPY, "model : Record the checksum of the model beside it"]
    assert sha256(node / "model.m") == sha256(src / "model.m")
    assert (node / "model.m.sha256").read_text().split()[0] == sha256(src / "model.m")


def test_the_controller_caches_each_version_it_hashed(tree, runs):
    tmp, src, _ = tree
    cached = sorted(p.read_text().strip() for p in (tmp / "cache").iterdir())
    # the first version (hashed twice: before and after the touch, one entry each) and the new one
    assert sha256(src / "model.m") in cached and len(cached) == 3


def test_the_api_unit_would_carry_the_checksums_of_the_model_and_tokenizer(tree, runs):
    if Path("/etc/systemd/system/dllama-api.service").exists():
        pytest.skip("dllama-api is installed on this machine: its unit would not be a new file here")
    tmp, src, node = tree
    (tmp / "api.yml").write_text(yaml.safe_dump([{"name": "The API", "hosts": "root", "gather_facts": False,
                                                  "roles": ["api"]}]))
    results = play(tree, str(tmp / "api.yml"), "--check", "--diff", "-e", f"api_venv={tmp / 'venv'}")
    (unit,) = [r for r in results["service : Install the systemd unit of dllama-api"] if not r.get("skipped")]
    diff = unit["diff"][0] if isinstance(unit["diff"], list) else unit["diff"]
    tokenizer = (node / "tok.sha256").read_text().split()
    assert f'Environment="DLLAMA_MODEL={sha256(src / "model.m")} model.m"' in diff["after"]
    assert f'Environment="DLLAMA_TOKENIZER={" ".join(tokenizer)}"' in diff["after"]
    assert 'Environment="DLLAMA_ENGINE=none"' in diff["after"]


# -- the download path: an HTTP server on loopback serves the model and the tokenizer -------------

FETCH = "model : Download the model, resuming a partial download"


@pytest.fixture(scope="module")
def downloads(tree, tmp_path_factory):
    """The role run three times against model_url: fresh, again, then a new model_checksum."""
    if shutil.which("curl") is None:
        pytest.skip("the role would install curl with apt here")
    tmp, src, _ = tree
    served = tmp_path_factory.mktemp("served")
    shutil.copytree(src / "tok", served / "tok")
    (served / "model.m").write_bytes(os.urandom(1 << 16))
    node = tmp / "download-node"
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0", "--directory",
                               str(served)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(server.stdout.readline().split(" port ")[1].split()[0])
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/tok/tokenizer.json", timeout=10) as answer:
            answer.read()

        def download():
            return play(tree, str(tmp / "model.yml"), "-e", json.dumps({
                "dllama_model_src": "", "dllama_tokenizer_src": "", "dllama_model_url": f"{url}/model.m",
                "dllama_model_checksum": f"sha256:{sha256(served / 'model.m')}", "dllama_tokenizer_url": f"{url}/tok",
                "dllama_model_path": str(node / "model.m"), "dllama_tokenizer_path": str(node / "tok")}))

        first, second = download(), download()
        (served / "model.m").write_bytes(os.urandom(1 << 16))
        new_model = download()
    finally:
        server.terminate()
        server.wait()
        server.stdout.close()
    return served, node, first, second, new_model


def test_a_download_is_recorded_and_not_fetched_again(downloads):
    _, _, first, second, _ = downloads
    assert ran(first, FETCH) and not ran(second, FETCH)
    assert changed(second) == []


def test_a_new_model_checksum_fetches_the_new_model(downloads):
    served, node, _, _, new_model = downloads
    assert ran(new_model, FETCH)
    assert sha256(node / "model.m") == sha256(served / "model.m")
    assert (node / "model.m.sha256").read_text() == f"{sha256(served / 'model.m')}  model.m\n"


# -- a named model: `dllama download` on the controller, from a hub on loopback -------------------

NAMED = "model : Download the named model on the controller"


@pytest.fixture(scope="module")
def named(tree, tmp_path_factory):
    """The role run twice with dllama_model: the first downloads on the controller and copies, the
    second changes nothing."""
    from local_hub import Hub, small_model_bytes, small_tokenizer_bytes

    tmp, _, _ = tree
    hub = Hub()
    hub.model, hub.tokenizer = small_model_bytes(tmp_path_factory.mktemp("m")), small_tokenizer_bytes()
    hub.add_model("qwen3_0.6b_q40", hub.model, hub.tokenizer)
    server, url = hub.serve()
    node = tmp / "named-node"
    try:
        def once():
            return play(tree, str(tmp / "model.yml"), "-e", json.dumps({
                "dllama_model": "qwen3_0.6b_q40", "dllama_model_download_dir": str(tmp / "controller-models"),
                "dllama_model_path": str(node / "model.m"), "dllama_tokenizer_path": str(node / "tok")}),
                DLLAMA_DOWNLOAD_BASE_URL=url)

        first, second = once(), once()
    finally:
        server.shutdown()
        server.server_close()
    return hub, node, first, second


def test_a_named_model_is_downloaded_on_the_controller_and_copied(named, tree):
    hub, node, first, second = named
    assert ran(first, NAMED) and NAMED in changed(first)
    assert (node / "model.m").read_bytes() == hub.model
    assert (node / "tok" / "dllama_tokenizer_qwen3_0.6b_q40.t").read_bytes() == hub.tokenizer
    assert changed(second) == []
    from dllama.tokenizer import Tokenizer

    assert Tokenizer.load(node / "tok").eos_ids >= {257}  # dllama-api's --tokenizer: the directory
