"""The run report as one self-contained HTML page: inline CSS, charts as data URIs, no script.

Every figure is written as `<td data-metric="NAME" data-value="RAW">formatted</td>`, so a test or a
scraper reads exact values without parsing the formatted text. Everything from the data is escaped.
"""
from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from typing import Any, Optional

import yaml

from pipeline.report.model import RunReport

CSS = """
body { font: 14px/1.45 -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #111827; background: #f3f4f6; }
main { max-width: 1180px; margin: 0 auto; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 10px; }
.sub { color: #4b5563; margin: 0 0 16px; word-break: break-all; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 13px; }
.complete { background: #d1fae5; color: #065f46; } .incomplete { background: #fee2e2; color: #991b1b; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 10px; }
.card { background: #fff; border-radius: 8px; padding: 10px 14px; box-shadow: 0 1px 2px #0001; }
.card table { width: 100%; border-collapse: collapse; }
.card td { padding: 2px 0; }
.card td.v { text-align: right; white-space: nowrap; padding-left: 8px; font-weight: 600;
             font-variant-numeric: tabular-nums; }
.card h3 { margin: 0 0 6px; font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: #6b7280; }
figure { background: #fff; border-radius: 8px; margin: 0 0 12px; padding: 10px; box-shadow: 0 1px 2px #0001; }
figure img { max-width: 100%; display: block; margin: 0 auto; }
figcaption { color: #4b5563; font-size: 13px; margin-top: 4px; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; } .charts figure.wide { grid-column: 1 / -1; }
table.list { width: 100%; border-collapse: collapse; background: #fff; border-radius: 8px; overflow: hidden; }
table.list th, table.list td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e5e7eb;
                               vertical-align: top; }
table.list th { background: #f9fafb; font-size: 13px; color: #374151; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: #fff; padding: 12px; border-radius: 8px; overflow-x: auto; }
ul.examples { margin: 0; padding-left: 18px; } .muted { color: #6b7280; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 10px; }
.sample { display: flex; gap: 10px; background: #fff; border-radius: 8px; padding: 10px; margin: 0;
          box-shadow: 0 1px 2px #0001; }
.sample img, .sample .noimg { width: 128px; height: 128px; flex: none; border-radius: 4px; object-fit: cover; }
.sample .noimg { background: #f3f4f6; color: #6b7280; font-size: 12px; display: flex; align-items: center;
                 justify-content: center; text-align: center; padding: 6px; box-sizing: border-box; }
.sample .body { min-width: 0; font-size: 13px; } .sample .text { white-space: pre-wrap; margin: 4px 0;
                overflow-wrap: anywhere; } .sample .error { color: #991b1b; overflow-wrap: anywhere; }
.sample .meta { color: #6b7280; font-size: 12px; } .sample .prompt { color: #374151; font-style: italic; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _metric(label: str, name: str, value: Any, unit: str = "", digits: int = 2) -> str:
    raw = "" if value is None else json.dumps(value)
    shown = _fmt(value, digits) + (f" {unit}" if unit and value is not None else "")
    return (f'<tr><td>{_e(label)}</td><td class="v" data-metric="{_e(name)}" data-value="{_e(raw)}">'
            f"{_e(shown)}</td></tr>")


def _card(title: str, rows: list[str]) -> str:
    return f'<div class="card"><h3>{_e(title)}</h3><table>{"".join(rows)}</table></div>'


def _summary(report: RunReport) -> str:
    f = report.figures
    return '<div class="cards">' + "".join([
        _card("Rows", [_metric("input", "rows_in", f["rows_in"]), _metric("output", "rows_out", f["rows_out"]),
                       _metric("captioned", "ok", f["ok"]), _metric("errors", "errors", f["errors"])]),
        _card("Speed", [_metric("wall time", "wall_s", f["wall_s"], "s", 1),
                        _metric("rows/s", "rows_per_s", f["rows_per_s"]),
                        _metric("generated tokens/s", "completion_tokens_per_s", f["completion_tokens_per_s"], "", 1),
                        _metric("all tokens/s", "total_tokens_per_s", f["total_tokens_per_s"], "", 1)]),
        _card("Tokens", [_metric("prompt", "prompt_tokens", f["prompt_tokens"]),
                         _metric("generated", "completion_tokens", f["completion_tokens"]),
                         _metric("generated per caption", "mean_completion_tokens", f["mean_completion_tokens"],
                                 "", 1)]),
        _card("Engine latency" + (f" (a 1-in-{f['sampled_1_in']} sample of rows)" if f.get("sampled_1_in", 1) > 1
                                  else ""), [_metric("rows timed", "latency_rows", f["latency_rows"]),
                                 _metric("p50", "latency_p50_s", f["latency_p50_s"], "s"),
                                 _metric("p90", "latency_p90_s", f["latency_p90_s"], "s"),
                                 _metric("p99", "latency_p99_s", f["latency_p99_s"], "s"),
                                 _metric("max", "latency_max_s", f["latency_max_s"], "s")]),
    ]) + "</div>"


def _cost(report: RunReport) -> str:
    c = report.cost
    unit = c["unit"]
    rows = [_metric(f"billed {unit}s", "cost_billed", c["billed"]),
            _metric(f"{unit} hours", "cost_hours", c["hours"], "h", 4),
            _metric(f"price per {unit} hour", "cost_hourly_usd", c["hourly_usd"], "$")]
    headline = []
    if c["hourly_usd"] is not None:
        rows.append(_metric("run cost", "cost_usd", c["usd"], "$", 4))
        headline = [_metric("$ per 1M images", "cost_usd_per_1m_images", c["usd_per_1m_images"], "$"),
                    _metric("$ per 1M captions", "cost_usd_per_1m_ok", c["usd_per_1m_ok"], "$")]
    assumptions = "".join(f"<li>{_e(a)}</li>" for a in c["assumptions"])
    return ('<div class="cards">' + (_card("Cost estimate", headline) if headline else "")
            + _card("Accelerator time", rows) + "</div>"
            + f'<p class="muted">Assumptions:</p><ul class="muted" data-section="cost-assumptions">{assumptions}</ul>')


CAPTIONS = {
    "throughput": "Rows finished per second (bars) and generated tokens per second (line) over the run; "
                  "below, rows done so far. A flat start is the model load and engine start-up.",
    "latency": "Seconds each answered row spent in Ray's engine stage, from submission (its wait for an "
               "engine slot included) to its last token.",
    "tokens": "Prompt tokens (the image's 256 soft tokens plus the text) and generated tokens per answered row.",
    "errors": "Error rows by kind; the table below lists example ids for each.",
}


def _charts(report: RunReport) -> str:
    parts = []
    for name, png in report.charts.items():
        data = base64.b64encode(png).decode("ascii")
        wide = ' class="wide"' if name in ("throughput", "errors") else ""
        parts.append(f'<figure{wide} data-chart="{_e(name)}"><img alt="{_e(name)} chart" '
                     f'src="data:image/png;base64,{data}"><figcaption>{_e(CAPTIONS.get(name, ""))}'
                     f"</figcaption></figure>")
    return f'<div class="charts">{"".join(parts)}</div>'


def _example(example: dict[str, Any]) -> str:
    """An example row: its id, and the input file it came from (which tells apart duplicated ids)."""
    source = example["source"] or ""
    if example["id"] is not None:
        where = source.rsplit("/", 1)[-1]
        return (f'<li data-example-id="{_e(example["id"])}"><code>{_e(example["id"])}</code> '
                f'<span class="muted" title="{_e(source)}">{_e(where)}</span></li>')
    return f'<li data-example-source="{_e(source)}">(no id) <code>{_e(source)}</code></li>'


def _errors(report: RunReport) -> str:
    if not report.errors:
        return '<p data-section="errors">No error rows.</p>'
    rows = []
    for entry in report.errors:
        message = entry["examples"][0]["error"] if entry["examples"] else ""
        examples = "".join(_example(x) for x in entry["examples"])
        rows.append(f'<tr data-error-kind="{_e(entry["kind"])}" data-count="{entry["count"]}">'
                    f'<td><code>{_e(entry["kind"])}</code></td><td>{_e(", ".join(entry["stages"]))}</td>'
                    f'<td class="v">{entry["count"]:,}</td><td><ul class="examples">{examples}</ul></td>'
                    f"<td>{_e(_shorten(message, 240))}</td></tr>")
    return ('<table class="list" data-section="errors"><tr><th>kind</th><th>stage</th><th>rows</th>'
            f'<th>example ids</th><th>first message</th></tr>{"".join(rows)}</table>')


GALLERY_TEXT_CHARS = 1200


def _thumbnail(entry: dict[str, Any]) -> str:
    if entry["thumbnail"] is not None:
        data = base64.b64encode(entry["thumbnail"]).decode("ascii")
        return f'<img data-thumbnail alt="image of {_e(entry["id"])}" src="data:image/jpeg;base64,{data}">'
    if not entry["decoded"]:
        why = "refused before its image decoded"
    else:
        why = "no thumbnail stored for this row (outside the job's thumbnail sample)"
    return f'<div class="noimg" data-no-thumbnail="{_e(why)}">{_e(why)}</div>'


def gallery_card(entry: dict[str, Any]) -> str:
    """One row: its thumbnail (or why there is none), id, prompt, text or error, finish reason, tokens and
    tool calls. Every value is escaped; the only image is the row's own JPEG thumbnail as a data URI."""
    meta = []
    if entry["finish_reason"] is not None:
        meta.append(f'finish <code data-field="finish_reason">{_e(entry["finish_reason"])}</code>')
    if entry["prompt_tokens"] is not None:
        meta.append(f'<span data-field="prompt_tokens">{_fmt(entry["prompt_tokens"])}</span> prompt + '
                    f'<span data-field="completion_tokens">{_fmt(entry["completion_tokens"])}</span> generated tokens')
    body = [f'<div><code data-field="id">{_e(entry["id"]) if entry["id"] is not None else "(no id)"}</code></div>']
    if entry["prompt"] is not None:
        label = "default prompt: " if entry["prompt_is_default"] else "prompt: "
        body.append(f'<div class="prompt"><span class="muted">{label}</span>'
                    f'<span data-field="prompt">{_e(_shorten(entry["prompt"], 300))}</span></div>')
    if entry["error"] is not None:
        body.append(f'<div class="error" data-field="error">{_e(_shorten(entry["error"], 400))}</div>')
    else:
        text = entry["text"]
        # NUL is dropped by HTML parsers; shown as U+FFFD, as it would be in any text view of the row.
        shown = _shorten(text, GALLERY_TEXT_CHARS).replace("\x00", "\ufffd") if text else ""
        body.append(f'<p class="text" data-field="text">{_e(shown)}</p>' if text
                    else '<p class="text muted" data-field="text"></p>')
    if entry["tool_calls"]:
        calls = entry["tool_calls"] if isinstance(entry["tool_calls"], str) else json.dumps(entry["tool_calls"],
                                                                                            ensure_ascii=False)
        body.append(f'<div>tool calls: <code data-field="tool_calls">{_e(_shorten(calls, 400))}</code></div>')
    if meta:
        body.append(f'<div class="meta">{" &middot; ".join(meta)}</div>')
    row_hash = "" if entry["row_hash"] is None else str(entry["row_hash"])
    kind = f' data-sample-error-kind="{_e(entry["error_kind"])}"' if entry["error_kind"] else ""
    return (f'<figure class="sample" data-row-id="{_e(entry["id"])}" data-row-hash="{_e(row_hash)}"{kind}>'
            f'{_thumbnail(entry)}<div class="body">{"".join(body)}</div></figure>')


def gallery_html(answered: list[dict[str, Any]], errors: dict[str, list[dict[str, Any]]]) -> str:
    """The gallery: sampled answered rows, then a few rows of each error kind."""
    parts = [f'<div class="gallery" data-section="gallery">{"".join(gallery_card(e) for e in answered)}</div>'
             if answered else '<p data-section="gallery">No answered rows to show.</p>']
    for kind, entries in errors.items():
        parts.append(f'<h3><code>{_e(kind)}</code></h3><div class="gallery" data-section="gallery-errors" '
                     f'data-kind="{_e(kind)}">{"".join(gallery_card(e) for e in entries)}</div>')
    return "".join(parts)


def _gallery(report: RunReport) -> str:
    if not report.gallery and not report.gallery_errors:
        return ""
    seed = ((report.manifest.get("config") or {}).get("report") or {}).get("gallery_seed")
    return ('<h2>Gallery</h2><p class="muted">A fixed-seed sample of the answered rows, each with its image as '
            "the model saw it (resized to the model's square input), then a few rows of each error kind. "
            "Rows refused before their image decoded show their error message only. "
            "<code>python -m jobs.show_output OUTPUT --html FILE --ids ...</code> shows any other rows.</p>"
            + gallery_html(report.gallery, report.gallery_errors))


def gallery_page(title: str, answered: list[dict[str, Any]], errors: dict[str, list[dict[str, Any]]]) -> str:
    """A page with only a gallery (`jobs.show_output --html`)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><main><h1>{_e(title)}</h1>
{gallery_html(answered, errors)}
</main></body></html>
"""


def _shorten(text: Optional[str], width: int) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _key_values(data: dict[str, Any], section: str) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(json.dumps(v) if isinstance(v, (list, dict)) else v)}"
                   f"</code></td></tr>" for k, v in data.items())
    return f'<table class="list" data-section="{_e(section)}">{rows}</table>'


def render_html(report: RunReport) -> str:
    m = report.manifest
    status = m["status"]
    model = m.get("model") or {}
    config_yaml = yaml.safe_dump(m.get("config") or {}, sort_keys=False)
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run = {"input": m["input"], "output": m["output"], "started": m["started"], "finished": m["finished"],
           "output files": len(m.get("files") or []), "host": m.get("host")}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Caption run report: {_e(m["output"])}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><main>
<h1>Caption run report <span class="badge {_e(status)}" data-metric="status"
 data-value="{_e(json.dumps(status))}">{_e(status)}</span></h1>
<p class="sub">{_e(m["output"])} &middot; {_e(m["started"])} &rarr; {_e(m["finished"])} &middot;
model {_e(model.get("source"))} ({_e(model.get("scheme"))})</p>
{_summary(report)}
<h2>Cost</h2>
{_cost(report)}
<h2>Charts</h2>
{_charts(report)}
<h2>Errors by kind</h2>
{_errors(report)}
{_gallery(report)}
<h2>Run</h2>
{_key_values(run, "run")}
<h2>Model</h2>
{_key_values(model, "model")}
<h2>Versions</h2>
{_key_values(m.get("versions") or {}, "versions")}
<h2>Configuration</h2>
<details><summary>the configuration the run used (YAML)</summary>
<pre data-section="config">{_e(config_yaml)}</pre></details>
<p class="muted">Generated {_e(generated)} from _manifest.json and the output rows by pipeline/report/build.py.</p>
</main></body></html>
"""
