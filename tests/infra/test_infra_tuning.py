"""tuning role: socket buffer sysctls now and after a reboot; the CPU governor where cpufreq exists."""

import pytest
from infra_hosts import hosts

testinfra_hosts = hosts("cluster")

SYSCTLS = {
    "net.core.rmem_max": "16777216",
    "net.core.wmem_max": "16777216",
    "net.ipv4.tcp_rmem": "4096 87380 16777216",
    "net.ipv4.tcp_wmem": "4096 87380 16777216",
}


@pytest.mark.parametrize("name", sorted(SYSCTLS))
def test_sysctl_has_the_cluster_value_now(host, name):
    assert " ".join(str(host.sysctl(name)).split()) == SYSCTLS[name]


@pytest.mark.parametrize("name", sorted(SYSCTLS))
def test_sysctl_persists_in_sysctl_d(host, name):
    lines = host.file("/etc/sysctl.d/90-dllama.conf").content_string.splitlines()
    values = {k.strip(): " ".join(v.split()) for k, _, v in (l.partition("=") for l in lines if "=" in l)}
    assert values[name] == SYSCTLS[name]


def test_cpu_governor_is_performance_where_cpufreq_exists(host):
    governor = host.file("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if not governor.exists:
        pytest.skip("no cpufreq on this node (a VM)")
    assert governor.content_string.strip() == "performance"


def test_cpu_governor_is_set_at_boot_where_cpufreq_exists(host):
    if not host.file("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").exists:
        pytest.skip("no cpufreq on this node (a VM)")
    raspi = host.file("/etc/default/cpu_governor")
    assert (raspi.exists and "CPU_DEFAULT_GOVERNOR=performance" in raspi.content_string) or \
        host.service("dllama-cpu-governor").is_enabled
