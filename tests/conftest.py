"""The order the test files go out in: `make test` runs them with `pytest -n 3 --dist loadfile`
(each file on one worker, files handed out in collection order), so the files that take longest
go first; one of them starting last would run alone at the end while the other workers wait."""

# The longest files (`--durations` of a full run), longest first: the wheelhouse (it compiles
# for every node kind), then the ones that run ansible-playbook against local nodes.
LONGEST_FIRST = [
    "test_wheelhouse.py",
    "test_ansible_playbooks.py",
    "test_ansible_model.py",
    "test_ansible_host_keys.py",
    "test_kernels.py",
    "test_ansible_firewall.py",
    "test_ansible_lint.py",
    "test_network_switch.py",
    "test_cluster.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # a stable sort: the tests of a file keep their order
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
