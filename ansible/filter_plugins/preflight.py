"""The rules of ansible/preflight.yml: what must hold of the inventory and the boards before
site.yml changes anything. One function per rule, each returning the problems it finds as lines
"HOST: what is wrong: the fix" (lines about several nodes name them sorted); `preflight_report`
runs them all.

    {{ nodes | preflight_report(groups, repo_dir) }}
        -> {'problems': [...], 'warnings': [...], 'summary': 'preflight: 4 nodes OK'}

`nodes` is one dict per host, as ansible/preflight.yml puts it together (its settings, its
`setup` result and the output of its one shell read, preflight_read_script); every key but
`name` may be missing. The model's size and each node's share of it come from the engine's own
code (engine/dllama/cluster/footprint.py, numpy-free), imported from this repository.
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "engine"
# The network role's bounds on dllama_prefix.
PREFIX_RANGE = (8, 30)
# Releases the wheelhouse is built for (Debian and Raspberry Pi OS share the numbers and names).
SUPPORTED_RELEASES = {"12": "bookworm", "13": "trixie"}
SUPPORTED_TEXT = "Debian / Raspberry Pi OS 12 (bookworm) and 13 (trixie)"
SUPPORTED_DISTRIBUTIONS = ("Debian", "Raspbian")
# Where dllama_model is downloaded on this controller unless dllama_model_download_dir says (the
# model role's model_download_dir default).
DOWNLOAD_DIR = "~/.cache/dllama-cluster/models"
# The kinds `make wheelhouse` builds when roles/engine/vars/main.yml cannot be read.
DEFAULT_WHEEL_KINDS = ("x86_64-cp311", "x86_64-cp313", "aarch64-cp311", "aarch64-cp313")
URL_TIMEOUT = 15  # seconds for the HTTP Range request of a model's header


# -- helpers -------------------------------------------------------------------------------------

def _size(n: int | float) -> str:
    """Bytes for people: KiB below a MiB, MiB below a GiB, GiB with one decimal above."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= 1 << 20:
        return f"{round(n / (1 << 20))} MiB"
    return f"{max(0, round(n / 1024))} KiB"


def _first_line(text, limit: int = 200) -> str:
    """The telling line of an error: the first, or the last when the first only introduces the
    others (Mitogen: "EOF on stream; last 100 lines received:" then ssh's complaint)."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    line = lines[0] if lines else "no message"
    if line.endswith(":") and len(lines) > 1:
        line = lines[-1]
    line = line.removeprefix("Task failed: ").rstrip(":")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _int(value):
    """An int from an inventory value (int or digits), else None."""
    if isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _reachable(node) -> bool:
    setup = node.get("setup") or {}
    return not setup.get("unreachable") and not setup.get("failed") and bool(setup.get("ansible_facts"))


def _facts(node) -> dict:
    return (node.get("setup") or {}).get("ansible_facts") or {}


def _read(node):
    """The output of the node's shell read, split into its `== name` sections; None for a node
    that is missing, was not reached, or whose read did not run."""
    if node is None or not _reachable(node):
        return None
    result = node.get("read") or {}
    if result.get("skipped") or result.get("unreachable") or "stdout" not in result:
        return None
    sections: dict[str, list[str]] = {}
    current = None
    for line in str(result["stdout"]).splitlines():
        if line.startswith("== "):
            current = sections.setdefault(line[3:].strip(), [])
        elif current is not None:
            current.append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items()}


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo lines as bytes: {'MemAvailable': 123456789, ...}."""
    out = {}
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def parse_links(text: str) -> dict[str, dict]:
    """`ip -d -j link show` as {ifname: {'mtu': .., 'max_mtu': ..}}; raises ValueError if unreadable."""
    links = json.loads(text)
    if not isinstance(links, list):
        raise ValueError("not a list of links")
    return {link["ifname"]: link for link in links if isinstance(link, dict) and "ifname" in link}


def parse_df(text: str) -> tuple[str, int]:
    """`df -P -B1 PATH` as (mount point, bytes available); raises ValueError if unreadable."""
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(_first_line(text))
    fields = lines[-1].split()
    if len(fields) < 6 or not fields[3].isdigit():
        raise ValueError(_first_line(text))
    return " ".join(fields[5:]), int(fields[3])


# -- the inventory ------------------------------------------------------------------------------

def group_problems(groups) -> list[str]:
    """Exactly one root; no node both root and worker; every cluster node in one of the two."""
    roots = list(groups.get("root") or [])
    workers = list(groups.get("workers") or [])
    problems = []
    if not roots:
        problems.append("no node in group root: put exactly one node under cluster: children: root: hosts: "
                        "(it holds the model and runs dllama-api)")
    elif len(roots) > 1:
        problems.append(f"{len(roots)} nodes in group root ({', '.join(sorted(roots))}): keep exactly one there "
                        "and move the others to workers")
    for host in roots:
        if host in workers:
            problems.append(f"{host}: in both root and workers: a node is the root or a worker, "
                            "remove it from one of the groups")
    for host in groups.get("cluster") or []:
        if host not in roots and host not in workers:
            problems.append(f"{host}: in cluster but neither in root nor in workers (it would run nothing): "
                            "put it in workers")
    return problems


def address_problems(nodes) -> list[str]:
    """Valid IPv4 host addresses, no two alike, all in one subnet, each gateway inside it."""
    problems = []
    networks: dict[str, ipaddress.IPv4Network] = {}
    by_address: dict[str, list[str]] = {}
    for node in nodes:
        name, address, raw_prefix = node["name"], str(node.get("address", "")).strip(), node.get("prefix", 24)
        prefix = _int(raw_prefix)
        if prefix is None or not PREFIX_RANGE[0] <= prefix <= PREFIX_RANGE[1]:
            problems.append(f"{name}: dllama_prefix {raw_prefix!r} is not a prefix length "
                            f"{PREFIX_RANGE[0]}..{PREFIX_RANGE[1]}: set dllama_prefix (24 for 255.255.255.0)")
            continue
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            problems.append(f"{name}: cluster address {address!r} is not an IPv4 address: "
                            "set dllama_address (or ansible_host) to one, e.g. 10.0.0.2")
            continue
        net = ipaddress.IPv4Network(f"{ip}/{prefix}", strict=False)
        if ip in (net.network_address, net.broadcast_address):
            kind = "network" if ip == net.network_address else "broadcast"
            problems.append(f"{name}: cluster address {ip} is the {kind} address of {net}: "
                            "give it a host address of that subnet")
            continue
        by_address.setdefault(str(ip), []).append(name)
        networks[name] = net
        gateway = str(node.get("gateway") or "").strip()
        if gateway:
            try:
                gw = ipaddress.IPv4Address(gateway)
            except ValueError:
                problems.append(f"{name}: gateway {gateway!r} is not an IPv4 address: "
                                f'set dllama_gateway to an address in {net}, or "" for none')
                continue
            if gw not in net:
                problems.append(f"{name}: gateway {gw} is outside {net} (the node's subnet): "
                                f'set dllama_gateway to an address in {net}, or "" for none')
    for address, names in by_address.items():
        if len(names) > 1:
            problems.append(f"{', '.join(sorted(names))}: the same cluster address {address}: "
                            "give every node its own dllama_address (or ansible_host)")
    subnets: dict[str, list[str]] = {}
    for name, net in networks.items():
        subnets.setdefault(str(net), []).append(name)
    if len(subnets) > 1:
        listed = "; ".join(f"{net} ({', '.join(sorted(names))})" for net, names in sorted(subnets.items()))
        problems.append(f"nodes in different subnets: {listed}: put every node in one subnet "
                        "(the same dllama_prefix, addresses that share it)")
    return problems


# -- the boards ---------------------------------------------------------------------------------

def reach_problem(node) -> str | None:
    """A node Ansible cannot reach or read facts from; its other checks are then skipped."""
    setup = node.get("setup") or {}
    if setup.get("unreachable"):
        return (f"cannot reach {node['name']} at {node.get('ssh_address') or node['name']}: "
                f"{_first_line(setup.get('msg'))}: check that it is up and that ssh works "
                f"(ansible {node['name']} -m ansible.builtin.ping)")
    if setup.get("failed") or not setup.get("ansible_facts"):
        return (f"{node['name']}: cannot read its facts: {_first_line(setup.get('msg'))}: "
                "check ansible_python_interpreter (a Python 3 on the node)")
    return None


def os_text(facts) -> str:
    dist = facts.get("distribution") or "unknown OS"
    version = facts.get("distribution_major_version") or facts.get("distribution_version") or ""
    release = facts.get("distribution_release") or ""
    text = f"{dist} {version}".strip() if version and version != "n/a" else dist
    return f"{text} ({release})" if release and release != "NA" else text


def supported_os(facts) -> bool:
    if facts.get("distribution") not in SUPPORTED_DISTRIBUTIONS:
        return False
    return (facts.get("distribution_major_version") in SUPPORTED_RELEASES
            or facts.get("distribution_release") in SUPPORTED_RELEASES.values())


def node_kind(facts) -> str:
    """ARCH-cpXY: what the engine role names a node's wheelhouse archive after."""
    version = (facts.get("python") or {}).get("version") or {}
    return f"{facts.get('architecture')}-cp{version.get('major')}{version.get('minor')}"


def wheel_kinds(repo_dir: str | os.PathLike = REPO) -> list[str]:
    """The node kinds `make wheelhouse` builds wheels for, as the engine role lists them
    (roles/engine/vars/main.yml, engine__wheel_kinds)."""
    try:
        import yaml

        kinds = yaml.safe_load((Path(repo_dir) / "roles/engine/vars/main.yml").read_text())["engine__wheel_kinds"]
        if isinstance(kinds, list) and all(isinstance(k, str) for k in kinds):
            return kinds
    except (ImportError, OSError, KeyError, TypeError, ValueError):
        pass
    return list(DEFAULT_WHEEL_KINDS)


def wheel_problem(node, repo_dir: str | os.PathLike = REPO) -> str | None:
    """The wheelhouse holds no archive for the node's kind (ARCH-cpXY.tar; ARCH-cpXY-source.tar for
    a node that builds the engine from source, engine_build_from_source)."""
    facts = _facts(node)
    kind = node_kind(facts)
    source = _truthy(node.get("build_from_source"))
    tar = f"{kind}-source.tar" if source else f"{kind}.tar"
    wheelhouse = Path(os.path.expanduser(str(node.get("wheelhouse") or Path(repo_dir) / "out" / "wheelhouse")))
    if (wheelhouse / tar).is_file():
        return None
    try:
        shown = wheelhouse.resolve().relative_to(Path(repo_dir).resolve())
    except ValueError:
        shown = wheelhouse
    version = (facts.get("python") or {}).get("version") or {}
    python = f"Python {version.get('major')}.{version.get('minor')}"
    what = f"{node['name']}: {os_text(facts)}, {python}, {facts.get('architecture')}: no "
    what += f"source archive in {shown} ({tar}, engine_build_from_source)" if source else f"wheel in {shown} ({tar})"
    kinds = wheel_kinds(repo_dir)
    if source:
        return f"{what}: run `make wheelhouse WHEELHOUSE_SOURCE={kind}` on the controller"
    if kind in kinds:
        return f"{what}: run `make wheelhouse` on the controller"
    if supported_os(facts) and any(k.startswith(f"{facts.get('architecture')}-") for k in kinds):
        return (f"{what}: Ansible runs another Python there than the release's: set ansible_python_interpreter: "
                "/usr/bin/python3 (the engine's venv is made from the system's Python)")
    release = "" if supported_os(facts) else f"supported are {SUPPORTED_TEXT}; "
    return (f"{what}: {release}`make wheelhouse` builds {', '.join(kinds)} only: reinstall the board with one of "
            f"those releases, or set engine_build_from_source: true for it and run "
            f"`make wheelhouse WHEELHOUSE_SOURCE={kind}`")


def interface_problems(nodes) -> tuple[list[str], list[str]]:
    """The cluster interface exists and takes dllama_mtu; every node has the same dllama_mtu.
    Returns (problems, warnings)."""
    problems, warnings = [], []
    mtus: dict[int, list[str]] = {}
    limited = []  # (node, interface, max_mtu, board)
    for node in nodes:
        name, iface = node["name"], str(node.get("interface") or "eth0")
        mtu = _int(node.get("mtu", 9000))
        if mtu is None or mtu < 68:
            problems.append(f"{name}: dllama_mtu {node.get('mtu')!r} is not an MTU: set dllama_mtu "
                            "(9000 for jumbo frames, 1500 without)")
            continue
        mtus.setdefault(mtu, []).append(name)
        sections = _read(node)
        if sections is None:
            continue
        try:
            links = parse_links(sections.get("links", ""))
        except (ValueError, KeyError, TypeError):
            warnings.append(f"{name}: cannot read its interfaces (`ip -d -j link show`: "
                            f"{_first_line(sections.get('links'))}): MTU not checked")
            continue
        if iface not in links:
            problems.append(f"{name}: no interface {iface} (it has {', '.join(sorted(links))}): "
                            "set dllama_interface to the wired one")
            continue
        max_mtu = _int(links[iface].get("max_mtu")) or 0  # 0 or absent: the driver sets no limit
        if max_mtu and mtu > max_mtu:
            limited.append((node, iface, max_mtu, sections.get("board") or ""))
    if limited:
        fits = min(min(m for _n, _i, m, _b in limited), min(mtus))
        for node, iface, max_mtu, board in limited:
            on = f" ({board})" if board else ""
            problems.append(f"{node['name']}: {iface} takes at most MTU {max_mtu}{on} but dllama_mtu is "
                            f"{node.get('mtu')}: set dllama_mtu: {fits} for every node (all nodes need the same "
                            "MTU) or replace the board")
    if len(mtus) > 1:
        listed = "; ".join(f"{mtu} ({', '.join(sorted(names))})" for mtu, names in sorted(mtus.items()))
        problems.append(f"nodes with different dllama_mtu: {listed}: set one dllama_mtu for every node "
                        "(frames larger than a peer's MTU are dropped)")
    return problems, warnings


# -- the model ----------------------------------------------------------------------------------

def footprint_module():
    """dllama.cluster.footprint: this repository's engine/ (an Ansible controller has no dllama
    installed); an engine already imported (a development venv) is used as it is."""
    if "dllama" not in sys.modules and ENGINE.is_dir() and str(ENGINE) not in sys.path:
        sys.path.insert(0, str(ENGINE))
    from dllama.cluster import footprint

    return footprint


def fetch_header(url: str, nbytes: int, timeout: float = URL_TIMEOUT) -> tuple[bytes, int | None]:
    """The first nbytes of a URL (an HTTP Range request) and the whole file's size when the
    server says it (Content-Range, else Content-Length of a full answer)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes=0-{nbytes - 1}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the operator's URL
        data = response.read(nbytes)
        total = None
        content_range = response.headers.get("Content-Range", "")
        if response.status == 206 and "/" in content_range:
            tail = content_range.rsplit("/", 1)[1].strip()
            total = int(tail) if tail.isdigit() else None
        elif response.status == 200 and response.headers.get("Content-Length", "").isdigit():
            total = int(response.headers["Content-Length"])
    return data, total


def named_model(name: str, download_dir: str) -> dict:
    """dllama_model NAME (`dllama download`'s list): {'src': the file it left in download_dir on
    this controller} if there, else {'url': its first part on the hub, 'parts': how many}; or
    {'problem': line} for a name not on the list."""
    footprint_module()  # engine/ on sys.path
    from dllama import download  # numpy-free, like footprint

    try:
        key = download.model_name(name)
    except download.DownloadError as e:
        return {"problem": f"dllama_model: {e}"}
    path = download.paths(os.path.expanduser(download_dir), key)[0]
    if path.is_file():
        return {"src": str(path)}
    model = download.MODELS[key]
    base = (os.environ.get(download.BASE_URL_ENV) or download.DEFAULT_BASE_URL).rstrip("/")
    return {"url": f"{base}/{model.repo}/resolve/main/{model.parts[0]}", "parts": len(model.parts)}


def read_model(src: str, url: str, whole: bool = True) -> dict:
    """The model's header from dllama_model_src on this controller, or from dllama_model_url
    (`whole=False`: the URL is a model's first part, so its size is not the model's).

    Returns {'header': ModelHeader, 'name': ...} or {'problem': line} or {'warning': line}."""
    src, url = str(src or "").strip(), str(url or "").strip()
    try:
        footprint = footprint_module()
    except ImportError as e:
        return {"warning": f"cannot import the engine's footprint rules from {ENGINE} ({e}): "
                           "memory and disk not checked"}
    if src:
        path = Path(os.path.expanduser(src))
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(footprint.HEADER_PROBE_BYTES)
        except OSError as e:
            return {"problem": f"dllama_model_src {src} cannot be read on this controller ({e.strerror}): "
                               "convert the model there (`dllama convert HF_DIR -o FILE --weights q40`) "
                               "or fix the path"}
        try:
            return {"header": footprint.read_header(head, str(path), size), "name": path.name}
        except ValueError as e:
            return {"problem": f"dllama_model_src: {e}"}
    try:
        head, size = fetch_header(url, footprint.HEADER_PROBE_BYTES)
    except (OSError, ValueError) as e:
        return {"warning": f"cannot read the model's header from {url} ({_first_line(e)}): "
                           "memory and disk not checked"}
    try:
        header = footprint.read_header(head, url, size if whole else None)
    except ValueError as e:
        return {"problem": f"dllama_model_url: {e}"}
    # A server that does not say the file's size: the header's layout gives it.
    return {"header": header, "name": url.rstrip("/").rsplit("/", 1)[-1]}


def memory_problems(nodes, order: list[str], header, model_name: str, max_seq_len, footprint, parallel=1,
                    kv_cache_type: str = "f32") -> tuple[list[str], list[str]]:
    """Every node has MemAvailable for its share of the weights, its KV cache (`parallel`
    sequences, dllama-api --parallel) and the runtime; a worker short of its first load's peak (no
    cached slice yet) gets a warning. `order` is the cluster's node order, root first (the API's
    --workers order). Returns (problems, warnings)."""
    sequences = _int(parallel) or 1
    try:
        prints = footprint.node_footprints(header, [1.0] * len(order), _int(max_seq_len), sequences,
                                           kv_cache_type if kv_cache_type in footprint.KV_BYTES else "f32")
    except ValueError as e:
        return [f"{len(order)} nodes cannot share {model_name}: {e}"], []
    positions = footprint.max_seq_len_of(header.config, _int(max_seq_len))
    by_name = {n["name"]: n for n in nodes}
    problems, warnings = [], []
    for name, fp in zip(order, prints):
        node = by_name.get(name)
        sections = _read(node)
        available = parse_meminfo((sections or {}).get("meminfo", "")).get("MemAvailable")
        if available is None or available >= fp.peak:
            continue
        if available >= fp.total:
            warnings.append(
                f"{name}: {_size(available)} of memory available: enough to serve {model_name}, but receiving its "
                f"{_size(fp.weights)} slice the first time needs about {_size(fp.peak)} at once (the received slice and "
                f"the copies bound from it); loads from its slice cache (worker_cache_dir) need {_size(fp.total)}")
            continue
        problems.append(
            f"{name}: {_size(available)} of memory available but its part of {model_name} needs "
            f"{_size(fp.total)} ({_size(fp.weights)} of weights as 1 of {len(order)} nodes, {_size(fp.kv_cache)} "
            f"KV cache for {_sequences(sequences)}{positions} tokens, {_size(fp.runtime)} runtime): add nodes, "
            f"lower api_max_seq_len{', api_parallel' if sequences > 1 else ''}, or free memory on it")
    return problems, warnings


def _sequences(n: int) -> str:
    return f"{n} sequences of " if n > 1 else ""


def disk_problem(node, header, model_name: str, model_path: str) -> str | None:
    """The root's filesystem for dllama_model_path has room for the model, unless it is there."""
    sections = _read(node)
    if sections is None or "df" not in sections:
        return None
    present = _int(sections.get("model", "").strip() or None)
    if present == header.file_size:
        return None
    try:
        mount, available = parse_df(sections["df"])
    except ValueError as e:
        return f"{node['name']}: cannot read the free space for {model_path} (df: {e}): check the path"
    if available >= header.file_size:
        return None
    return (f"{node['name']}: {_size(available)} free on {mount} but {model_path} needs "
            f"{_size(header.file_size)} ({model_name}): free space there or set dllama_model_path "
            "to a larger filesystem")


# -- all of it ----------------------------------------------------------------------------------

def preflight_report(nodes, groups, repo_dir=None) -> dict:
    """Every problem of the inventory and the boards, one line each, plus warnings and a summary."""
    nodes = [dict(n) for n in nodes]
    groups = {k: list(v) for k, v in dict(groups).items()}
    repo = Path(repo_dir) if repo_dir else REPO
    problems = group_problems(groups)
    problems += address_problems(nodes)
    warnings: list[str] = []
    for node in nodes:
        line = reach_problem(node)
        if line:
            problems.append(line)
        elif (line := wheel_problem(node, repo)):
            problems.append(line)
    iface_problems, iface_warnings = interface_problems(nodes)
    problems += iface_problems
    warnings += iface_warnings

    roots = [n for n in nodes if n["name"] in (groups.get("root") or [])]
    if len(roots) == 1:
        root = roots[0]
        src, url = str(root.get("model_src") or ""), str(root.get("model_url") or "")
        named = named_model(str(root["model_name"]), str(root.get("model_download_dir") or DOWNLOAD_DIR)) \
            if root.get("model_name") else {}
        if named:  # it wins over dllama_model_src / _url, as in the model role
            src, url = named.get("src", ""), named.get("url", "")
        if "problem" in named:
            problems.append(f"{root['name']}: {named['problem']}")
        elif not src and not url:
            problems.append(f"{root['name']}: no model: set dllama_model_src (a .m file on this controller) "
                            "or dllama_model_url (with dllama_model_checksum)")
        elif src and url:
            problems.append(f"{root['name']}: both dllama_model_src and dllama_model_url are set: "
                            'set the one the model comes from, the other to ""')
        else:
            model = read_model(src, url, whole=named.get("parts", 1) == 1)
            if "problem" in model:
                problems.append(f"{root['name']}: {model['problem']}")
            if "warning" in model:
                warnings.append(f"{root['name']}: {model['warning']}")
            if "header" in model:
                footprint = footprint_module()
                workers = [w for w in groups.get("workers") or [] if w != root["name"]]
                memory, memory_warnings = memory_problems(nodes, [root["name"]] + workers, model["header"],
                                                          model["name"], root.get("max_seq_len"), footprint,
                                                          root.get("parallel"), str(root.get("kv_cache_type")))
                problems += memory
                warnings += memory_warnings
                line = disk_problem(root, model["header"], model["name"], str(root.get("model_path") or ""))
                if line:
                    problems.append(line)
    elif len(groups.get("root") or []) == 1:
        # site.yml --limit without the root (a board added back): the model's plan is the root's
        warnings.append(f"memory and disk not checked: the root ({groups['root'][0]}) is not in this run (--limit)")
    else:
        warnings.append("memory and disk not checked: they need exactly one root node")
    summary = (f"Preflight found {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n"
               + "\n".join(f"  - {p}" for p in problems)) if problems else f"preflight: {len(nodes)} nodes OK"
    return {"problems": problems, "warnings": warnings, "summary": summary}


class FilterModule:
    def filters(self):
        return {"preflight_report": preflight_report}
