"""The e2e's preflight check: site.yml against a deliberately bad variant of the VMs' inventory
must stop in ansible/preflight.yml with exactly the expected problem lines and change nothing.

    from preflight_e2e import check_bad_inventory
    lines = check_bad_inventory(inventory.read_text(), lambda path: run_logged(
        netns_exec(playbook_argv_without_inventory + ["-i", path, "site.yml"]), RUN / "preflight-bad.log", env=env),
        RUN / "inventory")

The bad variant, from a good inventory (cluster: children: root / workers, vars at cluster level):
  - the first worker moves into root: two roots;
  - the last worker gets the root's cluster address: a duplicate address;
  - the first remaining worker gets a gateway outside the subnet, and dllama_mtu 65536, above
    any NIC's maximum (virtio-net's is 65535): "takes at most MTU", and the MTUs differ;
  - optionally a node that does not answer (an unused address of the subnet): "cannot reach".
It needs at least two workers. Only PyYAML (which Ansible brings) is imported.
"""
from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path

import yaml

BAD_MTU = 65536  # one more than the largest MTU an Ethernet device can take (ETH_MAX_MTU)
ROLES = ("network", "tuning", "engine", "worker", "model", "api")


class PreflightCheckFailed(AssertionError):
    """The bad inventory's run did not end as expected; the message says how."""


def _hosts(group: dict) -> dict:
    hosts = group.setdefault("hosts", {}) or {}
    group["hosts"] = hosts
    return hosts


def _var(name: str, host: dict, cluster_vars: dict, default=None):
    return (host or {}).get(name, cluster_vars.get(name, default))


def bad_inventory(good_inventory_text: str, unreachable: bool = True, ghost_address: str | None = None
                  ) -> tuple[str, list[str | re.Pattern]]:
    """The bad variant of an inventory (YAML text) and the problem lines preflight must print
    for it: strings for exact lines, compiled patterns for lines with machine-dependent parts.
    The node that does not answer is at ghost_address, by default the highest address of the
    subnet below the last one (often the gateway's or the controller's) that no node has."""
    inventory = yaml.safe_load(good_inventory_text)
    bad = copy.deepcopy(inventory)
    cluster = bad["cluster"]
    cluster_vars = cluster.setdefault("vars", {}) or {}
    children = cluster["children"]
    roots, workers = _hosts(children["root"]), _hosts(children["workers"])
    if len(roots) != 1 or len(workers) < 2:
        raise ValueError("the good inventory needs one root and at least two workers")
    root = next(iter(roots))

    def address(name, host):
        value = _var("dllama_address", host, cluster_vars, None)
        return str(host.get("ansible_host", name) if value in (None, "{{ ansible_host }}") else value)

    prefix = int(_var("dllama_prefix", roots[root], cluster_vars, 24))
    network = ipaddress.IPv4Network(f"{address(root, roots[root])}/{prefix}", strict=False)
    mtu = int(_var("dllama_mtu", roots[root], cluster_vars, 9000))
    interface = str(_var("dllama_interface", roots[root], cluster_vars, "eth0"))

    first = next(iter(workers))
    roots[first] = workers.pop(first)  # two roots
    rest = list(workers)
    twin, odd = rest[-1], rest[0]
    twin_host = workers[twin] = dict(workers[twin] or {})
    twin_host["dllama_address"] = address(root, roots[root])  # a duplicate address
    odd_host = workers[odd] = dict(workers[odd] or {})
    outside = next(n for n in (ipaddress.IPv4Network("192.0.2.0/24"), ipaddress.IPv4Network("198.51.100.0/24"))
                   if not n.overlaps(network))
    gateway = str(outside.network_address + 1)
    odd_host["dllama_gateway"] = gateway  # a gateway outside the subnet
    odd_host["dllama_mtu"] = BAD_MTU  # above the NIC's maximum

    names = [*roots, *workers]
    expected: list[str | re.Pattern] = [
        f"2 nodes in group root ({', '.join(sorted([root, first]))}): keep exactly one there and move the "
        "others to workers",
        f"{', '.join(sorted([root, twin]))}: the same cluster address {address(root, roots[root])}: give every "
        "node its own dllama_address (or ansible_host)",
        f"{odd}: gateway {gateway} is outside {network} (the node's subnet): set dllama_gateway to an address "
        f'in {network}, or "" for none',
        re.compile(rf"{re.escape(odd)}: {re.escape(interface)} takes at most MTU (\d+)( \(.*\))? but dllama_mtu "
                   rf"is {BAD_MTU}: set dllama_mtu: {mtu} for every node \(all nodes need the same MTU\) or "
                   r"replace the board"),
    ]
    if unreachable:
        used = {ipaddress.IPv4Address(address(n, h)) for g in (roots, workers) for n, h in g.items()}
        ghost_address = ghost_address or next(a for a in reversed(list(network.hosts())[:-1]) if a not in used)
        ghost = "ghost-worker"
        workers[ghost] = {"ansible_host": str(ghost_address), "ansible_connection": "ssh"}
        names.append(ghost)
        expected.append(re.compile(
            rf"cannot reach {ghost} at {re.escape(str(ghost_address))}: .+: check that it is up and that ssh "
            rf"works \(ansible {ghost} -m ansible\.builtin\.ping\)"))
    others = sorted(n for n in names if n != odd)
    expected.append(f"nodes with different dllama_mtu: {mtu} ({', '.join(others)}); {BAD_MTU} ({odd}): set one "
                    "dllama_mtu for every node (frames larger than a peer's MTU are dropped)")
    text = "# A deliberately bad variant of the e2e inventory (tests/vm/preflight_e2e.py).\n"
    return text + yaml.safe_dump(bad, sort_keys=False), expected


def problem_lines(output: str) -> list[str]:
    """The lines of ansible/preflight.yml's "Preflight found N problems:" message (the first
    time the output shows it); raises PreflightCheckFailed when the output has none."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"Preflight found (\d+) problems?:\s*$", line)
        if not m:
            continue
        found = []
        for following in lines[i + 1:]:
            item = re.match(r"^\s*- (.*)$", following)
            if not item:
                break
            found.append(item.group(1).rstrip())
        if len(found) != int(m.group(1)):
            raise PreflightCheckFailed(f"the message announces {m.group(1)} problems but lists {len(found)}:\n"
                                       + "\n".join(lines[i:i + len(found) + 1]))
        return found
    raise PreflightCheckFailed("the output has no \"Preflight found N problems\" message:\n"
                               + "\n".join(lines[-60:]))


def changes(output: str) -> list[str]:
    """What the run changed or started beyond the preflight: `changed:` results, role tasks,
    recap lines with changed > 0."""
    found = [ln for ln in output.splitlines() if ln.startswith("changed: [")]
    found += [ln for ln in output.splitlines()
              if re.match(rf"^TASK \[({'|'.join(ROLES)}) : ", ln)]
    recap = output.split("PLAY RECAP", 1)[-1] if "PLAY RECAP" in output else ""
    found += [ln.strip() for ln in recap.splitlines() if re.search(r"\bchanged=[1-9]", ln)]
    return found


def match_lines(found: list[str], expected: list[str | re.Pattern]) -> list[str]:
    """Every expected line matched by exactly one found line and nothing else; the complaints."""
    left = list(found)
    complaints = []
    for want in expected:
        hit = next((ln for ln in left if (want.fullmatch(ln) if isinstance(want, re.Pattern) else ln == want)),
                   None)
        if hit is None:
            complaints.append(f"missing: {want.pattern if isinstance(want, re.Pattern) else want}")
        else:
            left.remove(hit)
    complaints += [f"unexpected: {ln}" for ln in left]
    return complaints


def check_bad_inventory(good_inventory_text: str, run_playbook: Callable[[Path], tuple[int, str]],
                        directory: Path, unreachable: bool = True, ghost_address: str | None = None) -> list[str]:
    """Writes the bad variant to directory/hosts-bad.yml, runs `run_playbook(path)` (which runs
    `ansible-playbook -i path site.yml` and returns (rc, output)) and checks that it failed in
    the preflight with exactly the expected lines and changed nothing. Returns the lines."""
    text, expected = bad_inventory(good_inventory_text, unreachable, ghost_address)
    path = Path(directory) / "hosts-bad.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    rc, output = run_playbook(path)
    complaints = []
    if rc == 0:
        complaints.append("site.yml succeeded on the bad inventory")
    try:
        found = problem_lines(output)
    except PreflightCheckFailed as e:
        complaints.append(str(e))
        found = []
    else:
        complaints += match_lines(found, expected)
    complaints += [f"changed: {c}" for c in changes(output)]
    if complaints:
        raise PreflightCheckFailed("the preflight on the bad inventory " + str(path) + ":\n  "
                                   + "\n  ".join(complaints))
    return found
