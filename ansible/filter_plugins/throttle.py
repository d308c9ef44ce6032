"""Decode `vcgencmd get_throttled` into words, for ansible/health.yml and ad-hoc checks.

The firmware reports a bit field (`throttled=0x50005`); the low bits say what is happening now,
bits 16-19 what has happened since boot:

    bit  0  under-voltage now                 bit 16  under-voltage has occurred
    bit  1  arm frequency capped now          bit 17  frequency capping has occurred
    bit  2  throttled now                     bit 18  throttling has occurred
    bit  3  soft temperature limit now        bit 19  soft temperature limit has occurred

    {{ 'throttled=0x50005' | throttled_words }}    -> ['under-voltage now', 'throttled now',
                                                       'under-voltage has occurred',
                                                       'throttling has occurred']
    {{ 'throttled=0x50005' | throttled_fault }}    -> True (something is wrong right now)
"""

from __future__ import annotations

THROTTLE_BITS: dict[int, str] = {
    0: "under-voltage now",
    1: "arm frequency capped now",
    2: "throttled now",
    3: "soft temperature limit now",
    16: "under-voltage has occurred",
    17: "frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}
NOW_MASK = 0xF  # bits 0-3: the board is limited at this moment


def throttled_value(value) -> int:
    """The bit field from `throttled=0x50005`, `0x50005`, `50005` (hex, as vcgencmd prints) or an int."""
    if isinstance(value, bool):
        raise TypeError(f"not a vcgencmd get_throttled value: {value!r}")
    if isinstance(value, int):
        bits = value
    else:
        text = str(value).strip()
        if "=" in text:
            text = text.split("=", 1)[1].strip()
        try:
            bits = int(text, 16)
        except ValueError:
            raise ValueError(f"not a vcgencmd get_throttled value: {value!r}") from None
    if bits < 0:
        raise ValueError(f"not a vcgencmd get_throttled value: {value!r}")
    return bits


def throttled_words(value) -> list[str]:
    """Every set bit as words, lowest bit first; unknown bits as `unknown bit N`; [] when all clear."""
    bits = throttled_value(value)
    words = []
    for bit in range(bits.bit_length()):
        if bits >> bit & 1:
            words.append(THROTTLE_BITS.get(bit, f"unknown bit {bit}"))
    return words


def throttled_fault(value) -> bool:
    """True when the board is limited right now (any of bits 0-3): a fault, not a past event."""
    return bool(throttled_value(value) & NOW_MASK)


def throttled_summary(value) -> str:
    """One cell of the health table: the words joined, or `ok` when no bit is set."""
    return ", ".join(throttled_words(value)) or "ok"


class FilterModule:
    def filters(self):
        return {
            "throttled_value": throttled_value,
            "throttled_words": throttled_words,
            "throttled_fault": throttled_fault,
            "throttled_summary": throttled_summary,
        }
