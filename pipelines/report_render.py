"""Reports for people: terminal tables, CSV, JSON and one self-contained HTML page with inline SVG charts.

Pure functions from :class:`~dealpulse.pipelines.analytics.Report` to text.

>>> from dealpulse.pipelines.analytics import Report
>>> r = Report("health", ["metric", "value", "status"], [("mql_to_sql", 0.4, "ok"), ("deal_cycle_days", None, "no_data")])
>>> print(render_table(r))
metric           value  status
---------------  -----  -------
mql_to_sql         0.4  ok
deal_cycle_days      -  no_data
>>> print(render_csv(r).strip())
metric,value,status
mql_to_sql,0.4,ok
deal_cycle_days,,no_data
"""

from __future__ import annotations

import csv
import html
import io
from datetime import date, datetime
from typing import Any

import orjson

from dealpulse.pipelines.analytics import Report


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def render_table(report: Report) -> str:
    """An aligned plain-text table (numbers right-aligned)."""
    cells = [[_cell(v) for v in row] for row in report.rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(report.columns)]
    numeric = [bool(report.rows) and all(isinstance(row[i], int | float) and not isinstance(row[i], bool)
               for row in report.rows if row[i] is not None) and any(row[i] is not None for row in report.rows)
               for i in range(len(report.columns))]  # fmt: skip

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(report.columns), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def render_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(report.columns)
    for row in report.rows:
        writer.writerow(["" if v is None else v.isoformat() if isinstance(v, datetime | date) else v for v in row])
    return buffer.getvalue()


def render_json(report: Report) -> str:
    return orjson.dumps(report.records(), option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z).decode()


# -- HTML -------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;color:#1f2933;
padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #d9e2ec}
.meta{color:#52606d;font-size:.9rem}table{border-collapse:collapse;width:100%;font-size:.85rem;margin-top:.6rem}
th,td{padding:.3rem .5rem;border-bottom:1px solid #e4e7eb;text-align:left}td.num{text-align:right;
font-variant-numeric:tabular-nums}th{background:#f5f7fa}.ok{color:#127a3a;font-weight:600}
.warn{color:#b42318;font-weight:600}.no_data{color:#7b8794}svg text{font-size:12px;fill:#1f2933}
.legend span{display:inline-block;margin-right:1rem;font-size:.85rem}.sw{width:.8rem;height:.8rem;
display:inline-block;margin-right:.3rem;vertical-align:middle}.scroll{overflow-x:auto}
"""


def _html_table(report: Report, status_column: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in report.columns)
    body = []
    for row in report.rows:
        cells = []
        for column, value in zip(report.columns, row, strict=True):
            css = "num" if isinstance(value, int | float) and not isinstance(value, bool) else ""
            if column == status_column:
                css = html.escape(str(value))
            cells.append(f'<td class="{css}">{html.escape(_cell(value))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(report.columns)}">nothing to show</td></tr>')
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _funnel_svg(report: Report) -> str:
    records = report.records()
    if not records:
        return ""
    top = max(r["entered"] for r in records) or 1
    bar_h, gap, label_w, width = 26, 8, 130, 1000
    rows = []
    for i, r in enumerate(records):
        y = i * (bar_h + gap)
        scale = (width - label_w - 300) / top
        entered_w, converted_w = r["entered"] * scale, r["converted"] * scale
        rows.append(
            f'<text x="0" y="{y + 17}">{html.escape(r["stage"])}</text>'
            f'<rect x="{label_w}" y="{y}" width="{entered_w:.1f}" height="{bar_h}" fill="#9fb3c8">'
            f"<title>entered {r['entered']}</title></rect>"
            f'<rect x="{label_w}" y="{y}" width="{converted_w:.1f}" height="{bar_h}" fill="#2680c2">'
            f"<title>converted {r['converted']}</title></rect>"
            f'<text x="{label_w + entered_w + 6:.1f}" y="{y + 17}">{r["entered"]} entered · {r["converted"]} '
            f"converted ({_cell(r['conversion_rate'] * 100)} %)</text>"
        )
    height = len(records) * (bar_h + gap)
    legend = ('<div class="legend"><span><i class="sw" style="background:#9fb3c8"></i>entered</span>'
              '<span><i class="sw" style="background:#2680c2"></i>converted to a later stage</span></div>')  # fmt: skip
    return f'{legend}<svg role="img" aria-label="funnel" width="{width}" height="{height}">{"".join(rows)}</svg>'


def _dwell_svg(report: Report) -> str:
    records = [r for r in report.records() if r["p90_dwell_days"] is not None]
    if not records:
        return ""
    top = max(max(r["p90_dwell_days"], r["stall_threshold_days"]) for r in records) or 1
    bar_h, gap, label_w, width = 26, 8, 130, 1000
    scale = (width - label_w - 340) / top
    rows = []
    for i, r in enumerate(records):
        y = i * (bar_h + gap)
        p50, p90, threshold = (
            r["p50_dwell_days"] * scale,
            r["p90_dwell_days"] * scale,
            r["stall_threshold_days"] * scale,
        )
        rows.append(
            f'<text x="0" y="{y + 17}">{html.escape(r["stage"])}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{p90:.1f}" height="{bar_h - 8}" fill="#f0b429">'
            f"<title>p90 {r['p90_dwell_days']} days</title></rect>"
            f'<rect x="{label_w}" y="{y + 4}" width="{p50:.1f}" height="{bar_h - 8}" fill="#de911d">'
            f"<title>p50 {r['p50_dwell_days']} days</title></rect>"
            f'<line x1="{label_w + threshold:.1f}" x2="{label_w + threshold:.1f}" y1="{y}" y2="{y + bar_h}" '
            f'stroke="#b42318" stroke-width="2"><title>threshold {r["stall_threshold_days"]} days</title></line>'
            f'<text x="{label_w + max(p90, threshold) + 8:.1f}" y="{y + 17}">p50 {_cell(r["p50_dwell_days"])} · '
            f"p90 {_cell(r['p90_dwell_days'])} days · {_cell(r['blocking_rate'] * 100)} % blocking</text>"
        )
    height = len(records) * (bar_h + gap)
    legend = ('<div class="legend"><span><i class="sw" style="background:#de911d"></i>median dwell</span>'
              '<span><i class="sw" style="background:#f0b429"></i>p90 dwell</span>'
              '<span><i class="sw" style="background:#b42318"></i>stall threshold</span></div>')  # fmt: skip
    return f'{legend}<svg role="img" aria-label="dwell" width="{width}" height="{height}">{"".join(rows)}</svg>'


def render_html(reports: dict[str, Report], title: str, subtitle: str) -> str:
    """One page, no external resources: opens offline and prints well."""
    sections = []
    if "health" in reports:
        sections.append(
            f'<section id="health"><h2>Sales health</h2>{_html_table(reports["health"], "status")}</section>'
        )
    if "funnel" in reports:
        sections.append(f'<section id="funnel"><h2>Funnel</h2>{_funnel_svg(reports["funnel"])}'
                        f"{_html_table(reports['funnel'])}</section>")  # fmt: skip
    if "dwell" in reports:
        sections.append(f'<section id="dwell"><h2>Stage dwell</h2>{_dwell_svg(reports["dwell"])}'
                        f"{_html_table(reports['dwell'])}</section>")  # fmt: skip
    if "stalls" in reports:
        count = len(reports["stalls"].rows)
        sections.append(f'<section id="stalls"><h2>Stalled opportunities ({count})</h2>'
                        f"{_html_table(reports['stalls'])}</section>")  # fmt: skip
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="meta">{html.escape(subtitle)}</p>{"".join(sections)}</body></html>'
    )
