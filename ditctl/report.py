"""Self-contained HTML pages for `ditctl eval`: one file, images inlined as data URIs, no
scripts, no network, so a report can be mailed, archived or opened offline as it is."""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Mapping, Sequence

from PIL import Image

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1a1a1a; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
img { max-width: 100%; border: 1px solid #eee; image-rendering: pixelated; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: #666; }
.side { display: flex; gap: 1em; } .side > div { flex: 1; min-width: 0; }
"""


def data_uri(image: Image.Image | bytes) -> str:
    """A PNG as a data: URI (PIL images are encoded; bytes are taken to be PNG already)."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def escape(value: Any) -> str:
    return html.escape(str(value))


def _img(image: Image.Image | bytes, alt: str) -> str:
    return f'<img src="{data_uri(image)}" alt="{escape(alt)}">'


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>\n")


def fmt(value: Any, digits: int = 5) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def note(text: str) -> str:
    """A grey paragraph (escaped)."""
    return f'<p class="note">{escape(text)}</p>'


def render_report(metrics: Mapping[str, Any], images: Mapping[str, Image.Image | bytes],
                  config_text: str, scores_html: Sequence[str] = ()) -> str:
    """The evaluation report: loss curve, per-timestep table, comparison grid, the image
    metrics' sections (`scores_html`, rendered by each metric), config."""
    title = f"ditctl eval: {metrics.get('run') or 'base model'}"
    validation = metrics["validation"]
    models = metrics["models"]
    quantiles = list(models[0]["val_loss_by_t"]) if models else []
    body = [f"<h1>{escape(title)}</h1>",
            f"<p>Model {escape(metrics['model'])}. Evaluated {escape(metrics['created'])}.</p>",
            "<h2>Validation loss</h2>",
            f"<p>On the {escape(validation['description'])}, inputs "
            f"{escape(validation['inputs'])}; fixed "
            f"noise (seed {escape(validation['seed'])}) at timesteps "
            f"{escape(', '.join(f'{q:g}' for q in validation['quantiles']))}"
            f"{_shift_note(validation)}"
            ". Lower is better; the numbers are only comparable between evaluations of the same "
            "data.</p>",
            html_table(["model", "step", "validation loss"],
                       [[m["label"], m["step"], fmt(m["val_loss"])] for m in models])]
    if "curve" in images:
        body.append(_img(images["curve"], "validation loss by step"))
    body.append("<h2>Loss by timestep</h2>")
    body.append(html_table(["t"] + [m["label"] for m in models],
                           [[q] + [fmt(m["val_loss_by_t"].get(q)) for m in models]
                            for q in quantiles]))
    if "loss_by_t" in images:
        body.append(_img(images["loss_by_t"], "validation loss by timestep"))

    comparison = metrics.get("comparison") or {}
    body.append("<h2>Before / after</h2>")
    if "comparison" in images:
        body.append(f"<p>The same prompts and seeds through each model (columns: "
                    f"{escape(', '.join(comparison.get('columns', [])))}).</p>")
        body.append(_img(images["comparison"], "comparison grid"))
    else:
        body.append(f'<p class="note">No comparison images: {escape(comparison.get("note"))}</p>')
    body.append("<h2>Image scores</h2>" + "".join(scores_html))
    settings = metrics.get("sample_settings") or {}
    body.append("<h2>Sampling settings</h2>")
    body.append(html_table(["setting", "value"], [[k, v] for k, v in sorted(settings.items())]))
    body.append("<h2>Run configuration</h2>")
    body.append(f"<pre>{escape(config_text)}</pre>")
    return _page(title, "".join(body))


def render_comparison(metrics: Mapping[str, Mapping[str, Any]], table: Sequence[Sequence[str]],
                      images: Mapping[str, bytes]) -> str:
    """Two (or more) runs side by side: the metric table, then each run's curve and grid."""
    names = list(metrics)
    title = "ditctl eval --compare: " + " vs ".join(names)
    body = [f"<h1>{escape(title)}</h1>", "<h2>Metrics (latest checkpoint of each run)</h2>",
            html_table(["metric"] + names, table)]
    for kind, heading in (("curve.png", "Validation loss by step"),
                          ("comparison.png", "Before / after")):
        body.append(f"<h2>{heading}</h2><div class='side'>")
        for name in names:
            key = f"{name}/{kind}"
            content = _img(images[key], f"{name} {kind}") if key in images else \
                '<p class="note">not available</p>'
            body.append(f"<div><h3>{escape(name)}</h3>{content}</div>")
        body.append("</div>")
    return _page(title, "".join(body))


def _shift_note(validation: dict) -> str:
    """How the validation timesteps were shifted (as in training)."""
    if validation.get("timestep_shift") is not None:
        return f" (shifted by a fixed {validation['timestep_shift']:g} as in training)"
    return " (resolution-shifted as in training)" if validation.get("resolution_shift") else ""
