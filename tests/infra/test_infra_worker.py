"""worker role: dllama-worker.service, its user, key and slice cache, on every worker node."""

from infra_hosts import hosts

testinfra_hosts = hosts("workers")


def test_worker_service_is_enabled(host):
    assert host.service("dllama-worker").is_enabled


def test_worker_service_is_running(host):
    assert host.service("dllama-worker").is_running


def test_worker_listens_on_port_9999_of_its_cluster_address(host, node):
    assert host.socket(f"tcp://{node['address']}:9999").is_listening


def test_worker_runs_as_the_dllama_user(host):
    assert host.check_output("systemctl show --property=User --value dllama-worker") == "dllama"


def test_worker_unit_restarts_always(host):
    assert host.check_output("systemctl show --property=Restart --value dllama-worker") == "always"


def test_worker_threads_come_from_the_inventory(host, node):
    command = host.check_output("systemctl show --property=ExecStart --value dllama-worker")
    assert f"--nthreads {node['nthreads']} " in command


def test_dllama_user_is_a_system_user_without_login(host):
    user = host.user("dllama")
    assert user.exists and user.uid < 1000 and user.shell.endswith("nologin")


def test_cluster_key_mode_is_0600(host):
    assert host.file("/etc/dllama/cluster.key").mode == 0o600


def test_cluster_key_is_owned_by_dllama(host):
    key = host.file("/etc/dllama/cluster.key")
    assert (key.user, key.group) == ("dllama", "dllama")


def test_cluster_key_is_the_one_generated_on_the_controller(host, cluster_key):
    assert host.file("/etc/dllama/cluster.key").content_string.strip() == cluster_key


def test_slice_cache_directory_belongs_to_dllama(host):
    cache = host.file("/var/cache/dllama")
    assert cache.is_directory and cache.user == "dllama"
