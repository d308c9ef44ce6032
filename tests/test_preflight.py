"""ansible/preflight.yml: its rules one by one (ansible/filter_plugins/preflight.py, imported here:
it does not import Ansible), the node footprint they use (dllama.cluster.footprint, numpy-free), and
real `ansible-playbook` runs against inventories of local-connection hosts: a good one passes and
changes nothing, bad ones fail with exactly the expected lines, and site.yml stops before any role.
The runs that need an interface with a maximum MTU make one (a veth named eth0, max MTU 65535 like
virtio-net) in a network namespace of their own (`unshare --net`, root)."""

import http.server
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import dllama  # noqa: F401 - first, so the plugin uses the installed engine, not engine/ (no _core there)
from dllama.cluster import footprint
from dllama.config import Arch, FloatType, ModelConfig
from dllama.model_file import ModelFile, header_bytes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
import preflight_e2e  # noqa: E402

_spec = importlib.util.spec_from_file_location("preflight_rules", ROOT / "ansible" / "filter_plugins" / "preflight.py")
rules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rules)

GiB = 1 << 30
WHEEL = f"{platform.machine()}-cp{sys.version_info.major}{sys.version_info.minor}.tar"


# -- rules --------------------------------------------------------------------------------------

def node(name, address, **kw):
    return {"name": name, "address": address, "prefix": 24, "gateway": "", **kw}


def test_one_root_and_every_node_in_a_group_is_fine():
    assert rules.group_problems({"root": ["r"], "workers": ["a", "b"], "cluster": ["r", "a", "b"]}) == []


def test_two_roots_a_node_in_both_groups_and_one_in_neither():
    groups = {"root": ["r", "a"], "workers": ["a", "b"], "cluster": ["r", "a", "b", "c"]}
    assert rules.group_problems(groups) == [
        "2 nodes in group root (a, r): keep exactly one there and move the others to workers",
        "a: in both root and workers: a node is the root or a worker, remove it from one of the groups",
        "c: in cluster but neither in root nor in workers (it would run nothing): put it in workers",
    ]


def test_no_root():
    assert rules.group_problems({"workers": ["a"], "cluster": ["a"]}) == [
        "no node in group root: put exactly one node under cluster: children: root: hosts: "
        "(it holds the model and runs dllama-api)"]


def test_good_addresses_and_gateway():
    nodes = [node("r", "10.0.0.2", gateway="10.0.0.254"), node("a", "10.0.0.3"), node("b", "10.0.0.4")]
    assert rules.address_problems(nodes) == []


def test_a_duplicate_address_names_every_node_that_has_it():
    nodes = [node("r", "10.0.0.2"), node("b", "10.0.0.3"), node("a", "10.0.0.3"), node("c", "10.0.0.2")]
    assert rules.address_problems(nodes) == [
        "c, r: the same cluster address 10.0.0.2: give every node its own dllama_address (or ansible_host)",
        "a, b: the same cluster address 10.0.0.3: give every node its own dllama_address (or ansible_host)",
    ]


@pytest.mark.parametrize("address, prefix, line", [
    ("10.0.0.256", 24, "x: cluster address '10.0.0.256' is not an IPv4 address: set dllama_address (or "
                       "ansible_host) to one, e.g. 10.0.0.2"),
    ("pi-root.local", 24, "x: cluster address 'pi-root.local' is not an IPv4 address: set dllama_address (or "
                          "ansible_host) to one, e.g. 10.0.0.2"),
    ("10.0.0.0", 24, "x: cluster address 10.0.0.0 is the network address of 10.0.0.0/24: give it a host address "
                     "of that subnet"),
    ("10.0.1.255", 23, "x: cluster address 10.0.1.255 is the broadcast address of 10.0.0.0/23: give it a host "
                       "address of that subnet"),
    ("10.0.0.5", 31, "x: dllama_prefix 31 is not a prefix length 8..30: set dllama_prefix (24 for 255.255.255.0)"),
    ("10.0.0.5", "abc", "x: dllama_prefix 'abc' is not a prefix length 8..30: set dllama_prefix (24 for "
                        "255.255.255.0)"),
])
def test_an_address_that_is_not_a_host_of_its_subnet(address, prefix, line):
    assert rules.address_problems([node("x", address, prefix=prefix)]) == [line]


def test_nodes_in_two_subnets():
    nodes = [node("r", "10.0.0.2"), node("a", "10.0.1.3"), node("b", "10.0.0.4")]
    assert rules.address_problems(nodes) == [
        "nodes in different subnets: 10.0.0.0/24 (b, r); 10.0.1.0/24 (a): put every node in one subnet "
        "(the same dllama_prefix, addresses that share it)"]


def test_a_gateway_outside_the_subnet_or_not_an_address():
    nodes = [node("r", "10.0.0.2", gateway="10.0.1.1"), node("a", "10.0.0.3", gateway="router")]
    assert rules.address_problems(nodes) == [
        'r: gateway 10.0.1.1 is outside 10.0.0.0/24 (the node\'s subnet): set dllama_gateway to an address in '
        '10.0.0.0/24, or "" for none',
        'a: gateway \'router\' is not an IPv4 address: set dllama_gateway to an address in 10.0.0.0/24, or "" '
        'for none',
    ]


def facts(dist="Debian", major="12", release="bookworm", arch="x86_64", py=(3, 11)):
    return {"distribution": dist, "distribution_major_version": major, "distribution_release": release,
            "architecture": arch, "python": {"version": {"major": py[0], "minor": py[1]}}}


def board(name, links=None, meminfo="", df=None, model=None, board_name="", **kw):
    """A reachable node with its shell read's output."""
    out = f"== meminfo\n{meminfo}\n== links\n{links if links is not None else '[]'}\n== board\n{board_name}\n"
    if df is not None:
        out += f"== df\n{df}\n== model\n{model or ''}\n"
    node_facts = kw.pop("facts", None) or facts()
    return {"name": name, "setup": {"ansible_facts": node_facts}, "read": {"rc": 0, "stdout": out}, **kw}


def links(*specs):
    import json
    return json.dumps([{"ifname": n, "mtu": 1500, **({"max_mtu": m} if m is not None else {})} for n, m in specs])


def test_the_mtu_above_a_nic_s_maximum_names_the_board_and_the_mtu_that_fits():
    nodes = [board("r", links(("lo", 0), ("eth0", 9216)), mtu=9000),
             board("w3", links(("lo", 0), ("eth0", 1500)), mtu=9000, board_name="Raspberry Pi 4 Model B Rev 1.4"),
             board("w4", links(("eth0", None)), mtu=9000)]  # no max_mtu: no limit
    assert rules.interface_problems(nodes) == ([
        "w3: eth0 takes at most MTU 1500 (Raspberry Pi 4 Model B Rev 1.4) but dllama_mtu is 9000: set "
        "dllama_mtu: 1500 for every node (all nodes need the same MTU) or replace the board"], [])


def test_loopback_s_max_mtu_of_0_is_no_limit():
    assert rules.interface_problems([board("r", links(("lo", 0)), interface="lo", mtu=65536)]) == ([], [])


def test_a_missing_interface_lists_those_there_and_different_mtus_are_one_problem():
    nodes = [board("r", links(("lo", 0), ("end0", 9216), ("wlan0", 1500)), interface="eth0", mtu=9000),
             board("a", links(("eth0", 9216)), mtu=1500), board("b", links(("eth0", 9216)), mtu="9000")]
    assert rules.interface_problems(nodes) == ([
        "r: no interface eth0 (it has end0, lo, wlan0): set dllama_interface to the wired one",
        "nodes with different dllama_mtu: 1500 (a); 9000 (b, r): set one dllama_mtu for every node (frames "
        "larger than a peer's MTU are dropped)"], [])


def test_unreadable_interfaces_are_a_warning():
    problems, warnings = rules.interface_problems([board("r", "Option \"-j\" is unknown")])
    assert problems == []
    assert warnings == ['r: cannot read its interfaces (`ip -d -j link show`: Option "-j" is unknown): '
                        "MTU not checked"]


def test_the_wheel_for_the_node_s_architecture_and_python(tmp_path):
    wheelhouse = tmp_path / "out" / "wheelhouse"
    wheelhouse.mkdir(parents=True)
    (wheelhouse / "x86_64-cp311.tar").touch()
    ok = board("a", wheelhouse=str(wheelhouse))
    trixie = board("pi-worker3", wheelhouse=str(wheelhouse),
                   facts=facts(major="13", release="trixie", arch="aarch64", py=(3, 13)))
    assert rules.wheel_problem(ok, ROOT) is None
    assert rules.wheel_problem(trixie, tmp_path) == (
        "pi-worker3: Debian 13 (trixie), Python 3.13, aarch64: no wheel in out/wheelhouse (aarch64-cp313.tar): "
        "run `make wheelhouse` on the controller")
    kinds = ", ".join(rules.wheel_kinds())
    jammy = board("u", wheelhouse=str(wheelhouse), facts=facts("Ubuntu", "22", "jammy", py=(3, 10)))
    assert rules.wheel_problem(jammy, tmp_path) == (
        "u: Ubuntu 22 (jammy), Python 3.10, x86_64: no wheel in out/wheelhouse (x86_64-cp310.tar): supported are "
        f"Debian / Raspberry Pi OS 12 (bookworm) and 13 (trixie); `make wheelhouse` builds {kinds} only: reinstall "
        "the board with one of those releases, or set engine_build_from_source: true for it and run "
        "`make wheelhouse WHEELHOUSE_SOURCE=x86_64-cp310`")
    armhf = board("pi-zero", wheelhouse=str(wheelhouse), facts=facts(arch="armv7l"))
    assert rules.wheel_problem(armhf, tmp_path).startswith(
        "pi-zero: Debian 12 (bookworm), Python 3.11, armv7l: no wheel in out/wheelhouse (armv7l-cp311.tar): "
        f"`make wheelhouse` builds {kinds} only: ")
    pyenv = board("p", wheelhouse=str(wheelhouse), facts=facts(py=(3, 12)))
    assert rules.wheel_problem(pyenv, tmp_path) == (
        "p: Debian 12 (bookworm), Python 3.12, x86_64: no wheel in out/wheelhouse (x86_64-cp312.tar): Ansible runs "
        "another Python there than the release's: set ansible_python_interpreter: /usr/bin/python3 (the engine's "
        "venv is made from the system's Python)")
    jammy["build_from_source"] = "True"
    assert rules.wheel_problem(jammy, tmp_path) == (
        "u: Ubuntu 22 (jammy), Python 3.10, x86_64: no source archive in out/wheelhouse (x86_64-cp310-source.tar, "
        "engine_build_from_source): run `make wheelhouse WHEELHOUSE_SOURCE=x86_64-cp310` on the controller")
    (wheelhouse / "x86_64-cp310-source.tar").touch()
    assert rules.wheel_problem(jammy, tmp_path) is None


def test_the_kinds_make_wheelhouse_builds_are_the_engine_role_s():
    assert set(rules.wheel_kinds()) >= {"x86_64-cp311", "aarch64-cp311", "aarch64-cp313"}


def test_a_run_limited_to_a_worker_passes_and_leaves_the_memory_plan_to_the_root(tmp_path):
    # site.yml --limit WORKER (a board added back): the root's model is not read, and the warning
    # says why rather than claiming the groups are wrong
    wheelhouse = tmp_path / "out" / "wheelhouse"
    wheelhouse.mkdir(parents=True)
    (wheelhouse / "x86_64-cp311.tar").touch()
    worker = board("w", links(("eth0", 9216)), address="10.0.0.3", wheelhouse=str(wheelhouse), mtu=9000,
                   interface="eth0")
    report = rules.preflight_report([worker], {"root": ["r"], "workers": ["w"], "cluster": ["r", "w"]}, tmp_path)
    assert report["problems"] == []
    assert report["warnings"] == ["memory and disk not checked: the root (r) is not in this run (--limit)"]


def test_an_unreachable_node_is_a_problem_with_ssh_s_complaint():
    mitogen = {"unreachable": True, "msg": "Task failed: EOF on stream; last 100 lines received:\n"
                                           "ssh: connect to host 10.0.0.1 port 22: No route to host"}
    assert rules.reach_problem({"name": "pi-worker1", "ssh_address": "10.0.0.1", "setup": mitogen}) == (
        "cannot reach pi-worker1 at 10.0.0.1: ssh: connect to host 10.0.0.1 port 22: No route to host: check that "
        "it is up and that ssh works (ansible pi-worker1 -m ansible.builtin.ping)")
    broken = {"failed": True, "msg": "/usr/bin/python3: not found"}
    assert rules.reach_problem({"name": "b", "setup": broken}) == (
        "b: cannot read its facts: /usr/bin/python3: not found: check ansible_python_interpreter (a Python 3 on "
        "the node)")


# -- memory and disk ----------------------------------------------------------------------------

DENSE = ModelConfig(arch=Arch.QWEN3, dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                    vocab_size=256, seq_len=512, weight_type=FloatType.F32)


def write_model(path, config, sparse=True):
    """A .m file of the config: the header, then zeros (a sparse file)."""
    from dllama.model_file import expected_file_size
    with open(path, "wb") as f:
        f.write(header_bytes(config))
        f.truncate(expected_file_size(config))
    return path


def test_footprint_by_hand(tmp_path):
    """Two nodes of a small dense Qwen3 in F32: each holds the embedding, half the heads (one kv
    head of two), half the FFN, half the vocabulary of lm_head; its KV cache is capped at the
    model's seq_len."""
    path = write_model(tmp_path / "dense.m", DENSE)
    with ModelFile.open(path) as m:
        header = footprint.read_header(m.header(), str(path), m.size)
        assert header.file_size == m.size
    f4 = 4
    per_layer = (2 * 16 * 64 + 2 * 16 * 64 + 64 * 2 * 16 + 3 * 64 * 64 + 2 * 16 + 2 * 64) * f4
    weights = 256 * 64 * f4 + 2 * per_layer + 64 * f4 + 128 * 64 * f4
    fps = footprint.node_footprints(header, [1.0, 1.0], 4096)
    assert [fp.weights for fp in fps] == [weights, weights]
    assert [fp.kv_cache for fp in fps] == [2 * 2 * 512 * 16 * f4] * 2
    assert fps[0].total == weights + 2 * 2 * 512 * 16 * f4 + 150 * (1 << 20)
    assert fps[0].peak == fps[0].total and fps[1].peak == fps[1].total + weights
    assert footprint.node_footprints(header, [1.0], 100)[0].kv_cache == 2 * 2 * 100 * 32 * f4


def test_a_header_that_disagrees_with_the_file_size(tmp_path):
    path = write_model(tmp_path / "dense.m", DENSE)
    head = path.read_bytes()[:footprint.HEADER_PROBE_BYTES]
    with pytest.raises(ValueError, match="file is short"):
        footprint.read_header(head, "x.m", path.stat().st_size - 1)


def mem(available):
    kib = -(-available // 1024)  # /proc/meminfo counts in kB: rounded up, never below `available`
    return f"MemTotal: {kib + 100} kB\nMemAvailable: {kib} kB"


def test_memory_below_a_node_s_share_is_a_problem_and_below_a_worker_s_first_load_a_warning(tmp_path):
    path = write_model(tmp_path / "dense.m", DENSE)
    header = footprint.read_header(path.read_bytes()[:4096], str(path), path.stat().st_size)
    root_fp, worker_fp = footprint.node_footprints(header, [1.0, 1.0], 4096)
    nodes = [board("r", meminfo=mem(root_fp.total)), board("w", meminfo=mem(worker_fp.peak))]
    assert rules.memory_problems(nodes, ["r", "w"], header, "dense.m", 4096, footprint) == ([], [])
    nodes = [board("r", meminfo=mem(root_fp.total - 2048)), board("w", meminfo=mem(worker_fp.peak - 2048))]
    problems, warnings = rules.memory_problems(nodes, ["r", "w"], header, "dense.m", 4096, footprint)
    assert problems == [
        "r: 150 MiB of memory available but its part of dense.m needs 150 MiB (242 KiB of weights as 1 of 2 nodes, "
        "128 KiB KV cache for 512 tokens, 150 MiB runtime): add nodes, lower api_max_seq_len, or free memory on it"]
    assert warnings == [
        "w: 151 MiB of memory available: enough to serve dense.m, but receiving its 242 KiB slice the first time "
        "needs about 151 MiB at once (the received slice and the copies bound from it); loads from its slice cache "
        "(worker_cache_dir) need 150 MiB"]


def test_more_nodes_than_heads_cannot_share_a_model(tmp_path):
    path = write_model(tmp_path / "dense.m", DENSE)
    header = footprint.read_header(path.read_bytes()[:4096], str(path), path.stat().st_size)
    names = ["r", "a", "b", "c", "d"]
    assert rules.memory_problems([], names, header, "dense.m", 4096, footprint) == ([
        "5 nodes cannot share dense.m: 5 nodes cannot share 4 attention heads: use at most 4 nodes"], [])


DF = "Filesystem 1-blocks Used Available Capacity Mounted on\n/dev/mmcblk0p2 {total} 100 {avail} 5% /var lib"


def test_disk_space_for_the_model_on_the_root(tmp_path):
    header = footprint.ModelHeader(DENSE, 184, 20 * GiB)
    short = board("r", df=DF.format(total=64 * GiB, avail=12 * GiB))
    assert rules.disk_problem(short, header, "m.m", "/var lib/dllama/m.m") == (
        "r: 12.0 GiB free on /var lib but /var lib/dllama/m.m needs 20.0 GiB (m.m): free space there or set "
        "dllama_model_path to a larger filesystem")
    there = board("r", df=DF.format(total=64 * GiB, avail=12 * GiB), model=str(20 * GiB))
    assert rules.disk_problem(there, header, "m.m", "/x") is None
    exact = board("r", df=DF.format(total=64 * GiB, avail=20 * GiB), model=str(3 * GiB))
    assert rules.disk_problem(exact, header, "m.m", "/x") is None


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with or without Range support (path prefix /norange/ ignores Range)."""

    def do_GET(self):  # noqa: N802
        path = Path(self.server.directory) / self.path.rsplit("/", 1)[-1]
        if not path.exists():
            self.send_error(404)
            return
        data = path.read_bytes()
        ranged = self.headers.get("Range") and not self.path.startswith("/norange/")
        if ranged:
            end = int(self.headers["Range"].split("-")[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{end}/{len(data)}")
            data = data[:end + 1]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_models(tmp_path):
    write_model(tmp_path / "dense.m", DENSE)
    (tmp_path / "junk.m").write_bytes(b"not a model" * 100)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.directory = str(tmp_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_header_from_a_url_with_and_without_range_support(http_models):
    for prefix in ("/", "/norange/"):
        model = rules.read_model("", http_models + prefix + "dense.m")
        assert model["name"] == "dense.m" and "problem" not in model and "warning" not in model
        assert model["header"].config == DENSE
        assert model["header"].file_size == footprint.model_file_size(DENSE, model["header"].header_size)


def test_a_url_that_does_not_answer_is_a_warning_and_junk_is_a_problem(http_models, tmp_path):
    gone = rules.read_model("", http_models + "/missing.m")
    assert gone == {"warning": f"cannot read the model's header from {http_models}/missing.m (HTTP Error 404: "
                               "Not Found): memory and disk not checked"}
    junk = rules.read_model("", http_models + "/junk.m")
    assert junk["problem"].startswith(f"dllama_model_url: {http_models}/junk.m: not a dllama model file")
    missing = rules.read_model(str(tmp_path / "nope.m"), "")
    assert missing == {"problem": f"dllama_model_src {tmp_path / 'nope.m'} cannot be read on this controller "
                                  "(No such file or directory): convert the model there (`dllama convert HF_DIR "
                                  "-o FILE --weights q40`) or fix the path"}


def test_a_named_model_is_read_where_dllama_download_left_it_else_from_its_first_part(http_models, tmp_path,
                                                                                       monkeypatch):
    from dllama import download

    path = download.paths(tmp_path / "dl", "qwen3_14b_q40")[0]
    path.parent.mkdir(parents=True)
    write_model(path, DENSE)
    assert rules.named_model("qwen3-14b-q40", str(tmp_path / "dl")) == {"src": str(path)}
    monkeypatch.setenv(download.BASE_URL_ENV, http_models)
    named = rules.named_model("qwen3_14b_q40", str(tmp_path / "elsewhere"))
    repo = download.MODELS["qwen3_14b_q40"].repo
    assert named == {"url": f"{http_models}/{repo}/resolve/main/dllama_model_qwen3_14b_q40_aa", "parts": 2}
    # a first part: the header, but not the whole model's size
    part = tmp_path / "dllama_model_qwen3_14b_q40_aa"
    part.write_bytes(path.read_bytes()[:1000])
    model = rules.read_model("", named["url"], whole=False)
    assert model["header"].config == DENSE and model["header"].file_size == path.stat().st_size
    assert rules.named_model("qwen9", "x") == {"problem": "dllama_model: unknown model 'qwen9'; `dllama download "
                                                          f"--list` shows the {len(download.MODELS)} known ones"}


def test_footprint_and_the_rules_need_no_numpy(tmp_path):
    """The operator's controller has only Ansible: the plugin imports engine/ from the repository."""
    path = write_model(tmp_path / "dense.m", DENSE)
    code = (
        "import sys, importlib.util\n"
        "sys.modules['numpy'] = None\n"  # any `import numpy` raises ImportError
        f"spec = importlib.util.spec_from_file_location('p', {str(ROOT / 'ansible/filter_plugins/preflight.py')!r})\n"
        "p = importlib.util.module_from_spec(spec); spec.loader.exec_module(p)\n"
        f"m = p.read_model({str(path)!r}, '')\n"
        "import dllama; assert dllama.__file__.startswith(str(p.ENGINE)), dllama.__file__\n"
        "print(m['header'].file_size, p.footprint_module().node_footprints(m['header'], [1.0, 1.0], 64)[1].weights)\n")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(path.stat().st_size),
                                  str(footprint.node_footprints(footprint.read_header(
                                      path.read_bytes()[:4096], "x", path.stat().st_size), [1.0, 1.0], 64)[1].weights)]


# -- real ansible-playbook runs -----------------------------------------------------------------

def can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "--net", "ip", "link", "add", "eth0", "type", "veth", "peer", "name",
                           "eth0p"], capture_output=True).returncode == 0


NETNS = pytest.mark.skipif(not can_unshare(), reason="needs `unshare --net` and veth (root)")


def ansible_playbook(inventory, *args, netns=False, mitogen=True, hide_numpy=False, tmp_path=None):
    playbook = BIN / "ansible-playbook"
    if not playbook.exists():
        pytest.skip(f"ansible-playbook is not installed next to {sys.executable} (make deps)")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_BECOME": "false",
           "ANSIBLE_DEPRECATION_WARNINGS": "false"}
    hide = []
    if not mitogen:
        (tmp_path / "hide-mitogen").mkdir(exist_ok=True)
        (tmp_path / "hide-mitogen" / "ansible_mitogen.py").write_text('raise ImportError("hidden by the test")\n')
        hide.append(str(tmp_path / "hide-mitogen"))
    if hide_numpy:
        (tmp_path / "hide-numpy").mkdir(exist_ok=True)
        (tmp_path / "hide-numpy" / "numpy.py").write_text('raise ImportError("the controller has no numpy")\n')
        hide.append(str(tmp_path / "hide-numpy"))
    if hide:
        env["PYTHONPATH"] = os.pathsep.join(hide + [env.get("PYTHONPATH", "")])
    argv = [str(playbook), "-i", str(inventory), *args]
    if netns:
        # A namespace of its own with lo up and a veth called eth0 (max MTU 65535, like virtio-net).
        argv = ["unshare", "--net", "sh", "-c", "ip link set lo up && ip link add eth0 type veth peer name eth0p "
                "&& exec \"$@\"", "sh", *argv]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def recap(output):
    return {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
            for m in re.finditer(r"^(\S+)\s*:\s*(ok=.*)$", output.split("PLAY RECAP", 1)[-1], re.M)}


def inventory_text(tmp_path, hosts, interface="lo", extra=""):
    """Local-connection hosts: {name: (group, {vars})}; a wheelhouse with this machine's wheel and
    a small model on this controller."""
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir(exist_ok=True)
    (wheelhouse / WHEEL).touch()
    model = tmp_path / "small.m"
    if not model.exists():
        write_model(model, DENSE)
    groups = {"root": {}, "workers": {}}
    for name, (group, hostvars) in hosts.items():
        groups[group][name] = hostvars
    lines = ["cluster:", "  children:"]
    for group, members in groups.items():
        lines += [f"    {group}:", "      hosts:" + ("" if members else " {}")]
        for name, hostvars in members.items():
            lines.append(f"        {name}:" + ("" if hostvars else " {}"))
            lines += [f"          {k}: {v}" for k, v in hostvars.items()]
    lines += ["  vars:", "    ansible_connection: local", f"    ansible_python_interpreter: {sys.executable}",
              "    dllama_prefix: 24", f"    dllama_interface: {interface}", '    dllama_gateway: ""',
              "    dllama_mtu: 9000", f"    engine_wheelhouse: {wheelhouse}",
              f"    dllama_model_path: {tmp_path}/on-the-root/models/small.m", f"    dllama_model_src: {model}"]
    return "\n".join(lines) + "\n" + extra


GOOD = {"n-root": ("root", {"dllama_address": "10.0.0.2", "dllama_gateway": "10.0.0.254"}),
        "n-w1": ("workers", {"dllama_address": "10.0.0.3"}),
        "n-w2": ("workers", {"dllama_address": "10.0.0.4"})}


def test_a_good_inventory_passes_changes_nothing_and_needs_no_numpy_on_the_controller(tmp_path):
    inventory = tmp_path / "good.yml"
    inventory.write_text(inventory_text(tmp_path, GOOD))
    rc, out = ansible_playbook(inventory, "ansible/preflight.yml", hide_numpy=True, tmp_path=tmp_path)
    assert rc == 0, out[-4000:]
    assert "msg: 'preflight: 3 nodes OK'" in out, out[-3000:]
    assert recap(out).keys() == {"n-root", "n-w1", "n-w2"}
    assert all(r["changed"] == 0 and r["failed"] == 0 for r in recap(out).values()), out[-2000:]
    assert not (tmp_path / "on-the-root").exists()


def test_the_reads_run_under_check(tmp_path):
    inventory = tmp_path / "good.yml"
    inventory.write_text(inventory_text(tmp_path, {**GOOD, "n-w2": ("workers", {"dllama_address": "10.0.0.2"})}))
    rc, out = ansible_playbook(inventory, "ansible/preflight.yml", "--check", "--diff")
    assert rc != 0
    assert preflight_e2e.problem_lines(out) == [
        "n-root, n-w2: the same cluster address 10.0.0.2: give every node its own dllama_address (or ansible_host)"]


BAD = {"n-root": ("root", {"dllama_address": "10.0.0.2"}),
       "n-w1": ("root", {"dllama_address": "10.0.0.3"}),
       "n-w2": ("workers", {"dllama_address": "10.0.0.3", "dllama_gateway": "10.0.1.1", "dllama_mtu": 65536}),
       "n-gone": ("workers", {"dllama_address": "10.0.0.9", "ansible_connection": "ssh",
                              "ansible_host": "127.0.0.1", "ansible_port": 1})}
BAD_LINES = [
    "2 nodes in group root (n-root, n-w1): keep exactly one there and move the others to workers",
    'n-w2: gateway 10.0.1.1 is outside 10.0.0.0/24 (the node\'s subnet): set dllama_gateway to an address in '
    '10.0.0.0/24, or "" for none',
    "n-w1, n-w2: the same cluster address 10.0.0.3: give every node its own dllama_address (or ansible_host)",
    re.compile(r"cannot reach n-gone at 127\.0\.0\.1: .*Connection refused: check that it is up and that ssh "
               r"works \(ansible n-gone -m ansible\.builtin\.ping\)"),
    re.compile(r"n-w2: eth0 takes at most MTU 65535( \(.*\))? but dllama_mtu is 65536: set dllama_mtu: 9000 for "
               r"every node \(all nodes need the same MTU\) or replace the board"),
    "nodes with different dllama_mtu: 9000 (n-gone, n-root, n-w1); 65536 (n-w2): set one dllama_mtu for every "
    "node (frames larger than a peer's MTU are dropped)",
]


@NETNS
@pytest.mark.parametrize("mitogen", [True, False], ids=["mitogen", "without mitogen"])
def test_a_bad_inventory_fails_with_one_line_per_problem(tmp_path, mitogen):
    inventory = tmp_path / "bad.yml"
    inventory.write_text(inventory_text(tmp_path, BAD, interface="eth0"))
    rc, out = ansible_playbook(inventory, "ansible/preflight.yml", netns=True, mitogen=mitogen, tmp_path=tmp_path)
    assert rc != 0
    found = preflight_e2e.problem_lines(out)
    assert preflight_e2e.match_lines(found, BAD_LINES) == [], "\n".join(found)
    assert "fatal: [n-root -> localhost]: FAILED!" in out
    # Two roots: no memory plan, said as a warning, not a failure.
    assert "memory and disk not checked: they need exactly one root node" in out
    assert preflight_e2e.changes(out) == []


def test_memory_and_disk_for_a_model_too_large_for_this_machine(tmp_path):
    # A 1.7 TiB dense model (a sparse file): no node of a test machine has that much memory or disk.
    huge = ModelConfig(arch=Arch.QWEN3, dim=4096, hidden_dim=524288, n_layers=512, n_heads=32, n_kv_heads=8,
                       vocab_size=32000, seq_len=32768, weight_type=FloatType.Q40)
    write_model(tmp_path / "huge.m", huge)
    inventory = tmp_path / "huge.yml"
    inventory.write_text(inventory_text(tmp_path, GOOD).replace(str(tmp_path / "small.m"), str(tmp_path / "huge.m"))
                         .replace("on-the-root/models/small.m", "on-the-root/models/huge.m")
                         + "    api_max_seq_len: 1024\n")
    rc, out = ansible_playbook(inventory, "ansible/preflight.yml")
    assert rc != 0
    found = preflight_e2e.problem_lines(out)
    size = r"\d+(\.\d)? (GiB|MiB)"
    memory = [re.compile(rf"{n}: {size} of memory available but its part of huge\.m needs {size} \({size} of weights "
                         rf"as 1 of 3 nodes, {size} KV cache for 4 sequences of 1024 tokens, 150 MiB runtime\): add "
                         r"nodes, lower api_max_seq_len, api_parallel, or free memory on it")
              for n in ("n-root", "n-w1", "n-w2")]
    disk = re.compile(rf"n-root: {size} free on .+ but {re.escape(str(tmp_path))}/on-the-root/models/huge\.m needs "
                      r"1\d\d\d\.\d GiB \(huge\.m\): free space there or set dllama_model_path to a larger filesystem")
    assert preflight_e2e.match_lines(found, memory + [disk]) == [], "\n".join(found)


@NETNS
def test_site_yml_stops_in_the_preflight_before_any_role(tmp_path):
    """site.yml --check (in a network namespace of its own) on a bad inventory: the preflight's
    lines, no role's task, nothing changed; the e2e's helper checks it the same way."""
    good = inventory_text(tmp_path, {"n-root": ("root", {"dllama_address": "10.0.0.2"}),
                                     "n-w1": ("workers", {"dllama_address": "10.0.0.3"}),
                                     "n-w2": ("workers", {"dllama_address": "10.0.0.4"}),
                                     "n-w3": ("workers", {"dllama_address": "10.0.0.5"})}, interface="eth0")
    ran = []

    def run(path):
        ran.append(path)
        return ansible_playbook(path, "site.yml", "--check", netns=True)

    lines = preflight_e2e.check_bad_inventory(good, run, tmp_path / "inv", unreachable=True)
    assert len(lines) == 6 and ran == [tmp_path / "inv" / "hosts-bad.yml"]
    assert any(line.startswith("cannot reach ghost-worker at 10.0.0.253: ") for line in lines), lines


def test_the_e2e_helper_complains_about_a_missing_line_and_a_change(tmp_path):
    good = inventory_text(tmp_path, {"r": ("root", {"ansible_host": "10.1.0.2"}),
                                     "a": ("workers", {"ansible_host": "10.1.0.3"}),
                                     "b": ("workers", {"ansible_host": "10.1.0.4"})}, interface="eth0")
    text, expected = preflight_e2e.bad_inventory(good, unreachable=False)
    assert "192.0.2.1" in text and "65536" in text
    output = ("TASK [network : Check the cluster address settings]\nchanged: [b]\n"
              "Preflight found 1 problem:\n  - 2 nodes in group root (a, r): keep exactly one there and move the "
              "others to workers\nOrigin: x\nPLAY RECAP\nb : ok=1 changed=1 unreachable=0 failed=1\n")
    with pytest.raises(preflight_e2e.PreflightCheckFailed) as e:
        preflight_e2e.check_bad_inventory(good, lambda path: (2, output), tmp_path)
    message = str(e.value)
    assert "missing: r, b: the same cluster address" not in message  # names are sorted
    assert "missing: b, r: the same cluster address 10.1.0.2" in message
    assert "changed: changed: [b]" in message and "changed: TASK [network : " in message
    assert "changed: b : ok=1 changed=1" in message
