"""model and api roles: the model on the root node, dllama-api.service driving every worker."""

import json

from infra_hosts import hosts

testinfra_hosts = hosts("root")


def get(host, path):
    """GET http://127.0.0.1:8080{path} on the node (minimal images have python3, not curl)."""
    script = ("import sys, urllib.request; "
              f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:8080{path}', timeout=30).read().decode())")
    return host.check_output("python3 -c %s", script)


def test_model_file_is_on_the_root(host, node):
    model = host.file(node["model_path"])
    assert model.is_file and model.size > 0


def test_tokenizer_is_on_the_root(host, node):
    assert host.file(f"{node['tokenizer_path']}/tokenizer.json").is_file


def test_api_service_is_enabled(host):
    assert host.service("dllama-api").is_enabled


def test_api_service_is_running(host):
    assert host.service("dllama-api").is_running


def test_api_listens_on_port_8080(host):
    assert host.socket("tcp://0.0.0.0:8080").is_listening


def test_api_runs_as_the_dllama_user(host):
    assert host.check_output("systemctl show --property=User --value dllama-api") == "dllama"


def test_api_unit_restarts_always(host):
    assert host.check_output("systemctl show --property=Restart --value dllama-api") == "always"


def test_api_cluster_key_mode_is_0600(host):
    assert host.file("/etc/dllama/cluster.key").mode == 0o600


def test_api_cluster_key_is_the_one_generated_on_the_controller(host, cluster_key):
    assert host.file("/etc/dllama/cluster.key").content_string.strip() == cluster_key


def test_api_reports_every_worker_up(host, cluster):
    health = json.loads(get(host, "/health"))
    workers = {w["address"]: w["up"] for w in health["workers"]}
    expected = {f"{n['address']}:9999" for n in cluster.values() if "workers" in n["groups"]}
    assert set(workers) == expected and all(workers.values()), health
