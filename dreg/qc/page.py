"""OUT/qc/index.html: one static page with every picture and number of the QC.

The pictures are embedded as data: URIs, so the page is one file that opens offline,
from local disk or downloaded from object storage, with nothing else to fetch.
"""

from __future__ import annotations

import base64
import html

from dreg.qc.report import QcReport, summary_rows

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1560px;
       color: #222; background: #fafafa; }
h1 { margin-bottom: 0.2em; }
.ok { color: #1b7e2c; } .warn { color: #b35900; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left;
         vertical-align: top; }
th { background: #eee; }
figure { margin: 1.5em 0; } figcaption { color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; background: white; }
code { background: #eee; padding: 0 0.2em; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_page(report: QcReport, pngs: dict[str, bytes]) -> str:
    """The page's HTML: verdict, the numbers, every stage, then every picture."""
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(r['measure'])}</th><td>{e(r['value'])}</td></tr>"
                     for r in summary_rows(report))
    folds = "".join(
        f"<tr><td>{e(str(f['region']))}</td><td>{e(str(f['centre_xyz']))}</td>"
        f"<td>{f['voxels']}</td></tr>" for f in report.fold_chunks)
    fold_table = (f"<h2>Field chunks with folds</h2><table><tr><th>region (field voxels z, "
                  f"y, x)</th><th>centre (world x, y, z)</th><th>voxels with det J ≤ 0</th>"
                  f"</tr>{folds}</table>") if folds else ""
    figures = "\n".join(
        f'<figure id="{e(p.name)}"><h2>{e(p.title)}</h2>'
        f'<img src="{data_uri(pngs[p.name])}" alt="{e(p.title)}" width="{p.width}" '
        f'height="{p.height}"><figcaption>{e(p.caption)}</figcaption></figure>'
        for p in report.pictures)
    reason = f" — {e(report.reason)}" if report.reason else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Registration QC: {e(report.output)}</title><style>{STYLE}</style></head>
<body>
<h1>Registration quality control</h1>
<p>Output <code>{e(report.output)}</code>, field <code>{e(report.field)}</code></p>
<p class="{e(report.qc)}"><strong>QC: {e(report.qc)}</strong>{reason}</p>
<table>{rows}</table>
{fold_table}
{figures}
</body></html>
"""
