"""The appliance's playbooks pass ansible-lint's production profile and Ansible's syntax check."""

from ansible_cli import run, tool

PLAYBOOKS = ["site.yml", "ansible/health.yml", "ansible/preflight.yml", "ansible/teardown.yml", "ansible/upgrade.yml"]


def test_playbooks_pass_the_syntax_check():
    result = run(tool("ansible-playbook"), "--syntax-check", *PLAYBOOKS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_lint_production_profile_passes():
    result = run(tool("ansible-lint"), "--offline", "--profile", "production", "--nocolor",
                 *PLAYBOOKS, "ansible/tasks/cluster_serves.yml", "ansible/requirements.yml", "roles")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_example_inventory_parses_into_the_cluster_groups():
    result = run(tool("ansible-inventory"), "--graph", "cluster")
    assert result.returncode == 0, result.stdout + result.stderr
    graph = result.stdout
    for line in ("@root:", "@workers:", "pi-root", "pi-worker1", "pi-worker3", "pi-worker4"):
        assert line in graph
