"""Lay rows out as a plain-text table with aligned columns (the cluster table of ansible/health.yml).

    {{ rows | text_table(['node', 'temp']) }}   rows: a list of dicts keyed by those column names
"""

from __future__ import annotations


def text_table(rows, columns) -> str:
    """A header line, a rule, then one line per row; missing cells are `-`, cells are single-line."""
    header = [str(c) for c in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(values):
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    return " ".join(str(value).split())


class FilterModule:
    def filters(self):
        return {"text_table": text_table}
