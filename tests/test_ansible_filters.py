"""The health playbook's filters: `vcgencmd get_throttled` decoded into words, and the text table."""

import importlib.util
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parent.parent / "ansible" / "filter_plugins"


def load(name):
    spec = importlib.util.spec_from_file_location(f"dllama_filter_{name}", PLUGINS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throttle = load("throttle")
table = load("table")

EVERY_BIT = [
    (0, "under-voltage now", True),
    (1, "arm frequency capped now", True),
    (2, "throttled now", True),
    (3, "soft temperature limit now", True),
    (16, "under-voltage has occurred", False),
    (17, "frequency capping has occurred", False),
    (18, "throttling has occurred", False),
    (19, "soft temperature limit has occurred", False),
]


@pytest.mark.parametrize("bit,words,fault_now", EVERY_BIT)
def test_each_bit_decodes_to_its_words(bit, words, fault_now):
    value = f"throttled={1 << bit:#x}"
    assert throttle.throttled_words(value) == [words]
    assert throttle.throttled_fault(value) is fault_now
    assert throttle.throttled_summary(value) == words


def test_all_clear_is_ok_and_no_fault():
    assert throttle.throttled_words("throttled=0x0") == []
    assert throttle.throttled_summary("throttled=0x0") == "ok"
    assert throttle.throttled_fault("throttled=0x0") is False


def test_under_voltage_and_throttling_now_and_since_boot():
    # the classic weak power supply: 0x50005
    assert throttle.throttled_words("throttled=0x50005") == [
        "under-voltage now",
        "throttled now",
        "under-voltage has occurred",
        "throttling has occurred",
    ]
    assert throttle.throttled_fault("throttled=0x50005") is True


def test_past_events_only_are_not_a_fault():
    assert throttle.throttled_words("throttled=0x50000") == [
        "under-voltage has occurred",
        "throttling has occurred",
    ]
    assert throttle.throttled_fault("throttled=0x50000") is False
    assert throttle.throttled_fault("throttled=0xf0000") is False


def test_every_known_bit_at_once():
    value = "throttled=0xf000f"
    assert throttle.throttled_words(value) == [words for _, words, _ in EVERY_BIT]
    assert throttle.throttled_fault(value) is True


def test_hot_board_soft_limit_now_and_capped_since_boot():
    assert throttle.throttled_words("throttled=0x20008") == [
        "soft temperature limit now",
        "frequency capping has occurred",
    ]
    assert throttle.throttled_fault("throttled=0x20008") is True


def test_unknown_bits_are_named_not_dropped():
    assert throttle.throttled_words(0x100010) == ["unknown bit 4", "unknown bit 20"]
    assert throttle.throttled_fault(0x100010) is False


@pytest.mark.parametrize("value", ["throttled=0x50005", "0x50005", "50005", " throttled=0x50005\n", 0x50005])
def test_accepts_what_vcgencmd_prints_and_plain_numbers(value):
    assert throttle.throttled_value(value) == 0x50005


@pytest.mark.parametrize("value", ["throttled=", "throttled=zz", "", "-0x1", True])
def test_rejects_what_is_not_a_throttle_value(value):
    with pytest.raises((ValueError, TypeError)):
        throttle.throttled_value(value)


def test_filters_are_registered_under_their_names():
    names = throttle.FilterModule().filters()
    assert set(names) == {"throttled_value", "throttled_words", "throttled_fault", "throttled_summary"}
    assert table.FilterModule().filters() == {"text_table": table.text_table}


def test_text_table_aligns_columns_and_marks_missing_cells():
    rows = [
        {"node": "pi-root", "temp": "52.1'C", "mtu": 9000},
        {"node": "pi-worker1", "mtu": "9000"},
    ]
    assert table.text_table(rows, ["node", "temp", "mtu"]).splitlines() == [
        "node        temp    mtu",
        "----------  ------  ----",
        "pi-root     52.1'C  9000",
        "pi-worker1  -       9000",
    ]


def test_text_table_joins_lists_and_flattens_line_breaks():
    text = table.text_table([{"a": ["x", "y"], "b": "one\ntwo"}], ["a", "b"])
    assert text.splitlines()[-1] == "x, y  one two"
