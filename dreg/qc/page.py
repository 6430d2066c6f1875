"""OUT/qc/index.html: one static page with every picture and number of the QC.

The pictures are embedded as data: URIs, so the page is one file that opens offline,
from local disk or downloaded from object storage, with nothing else to fetch.
"""

from __future__ import annotations

import base64
import html
import shlex

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


def viewer_command(out: str) -> str:
    """The command that opens OUT in the web viewer."""
    return f"dreg view {shlex.quote(out)}"


def viewer_section(out: str, viewer_url: str | None) -> str:
    """How to look at the volumes in 3D: the command always (a page outlives any viewer),
    and the link to a viewer of OUT that was running when the page was written."""
    e = html.escape
    running = (f' A viewer of this output was running when this page was written: '
               f'<a id="viewer-link" href="{e(viewer_url)}">{e(viewer_url)}</a> (it answers '
               f'only while that <code>dreg view</code> runs, on the machine that ran it).'
               if viewer_url else "")
    return (f'<p id="viewer">Fixed, warped and det J in 3D, in a web viewer (Neuroglancer): '
            f'run <code>{e(viewer_command(out))}</code> and open the URL it prints.'
            f'{running}</p>')


def render_page(report: QcReport, pngs: dict[str, bytes], viewer_url: str | None = None
                ) -> str:
    """The page's HTML: verdict, the numbers, every stage, then every picture; and how to
    open the web viewer (with `viewer_url`, the link to one that is running)."""
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
{viewer_section(report.output, viewer_url)}
{fold_table}
{figures}
</body></html>
"""
