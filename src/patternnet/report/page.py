"""HTML building blocks of the report: escaping, tables, inline images, the page shell.

Everything here produces plain strings; nothing is fetched from the network when the page is
opened (no JavaScript framework, no CDN, no web fonts): images are ``data:`` URIs holding PNG
bytes, the style sheet is inline, and the method columns of the explanation grid are hidden
and shown with CSS alone (a checkbox per column, see :func:`toggle_css`).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "STYLE",
    "escape",
    "figure_png",
    "format_value",
    "image_png",
    "img_tag",
    "page",
    "table",
    "toggle_css",
]

STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 0 auto; max-width: 1400px; padding: 0 24px 48px; color: #1d1d1f; }
header { border-bottom: 1px solid #ddd; margin-bottom: 12px; }
h1 { font-size: 22px; margin: 18px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #eee; padding-bottom: 4px; }
.meta, .note, .caption { color: #555; font-size: 12.5px; }
nav a { margin-right: 14px; font-size: 13px; }
table.data { border-collapse: collapse; margin: 8px 0 12px; font-size: 12.5px; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.data th { background: #f4f4f6; }
table.data td:first-child, table.data th:first-child { text-align: left; }
table.grid { border-collapse: collapse; }
table.grid th { font-size: 12px; font-weight: 600; padding: 2px 4px; vertical-align: bottom; }
table.grid th small { display: block; font-weight: 400; color: #666; }
table.grid th.row { text-align: right; vertical-align: middle; max-width: 140px; }
table.grid td { padding: 2px; }
table.grid img { display: block; border: 1px solid #ccc; }
img.pixelated { image-rendering: pixelated; }
.toggles label { margin-right: 14px; font-size: 13px; cursor: pointer; }
.toggles input { margin-right: 3px; }
.grid-wrap { overflow-x: auto; margin-top: 8px; }
figure { margin: 8px 0 16px; }
figure img { max-width: 100%; height: auto; }
.absent { color: #8a5300; background: #fff7e6; border: 1px solid #f3d9a4;
          padding: 6px 10px; border-radius: 4px; }
"""


def escape(value: Any) -> str:
    """``str(value)`` with ``& < > " '`` escaped for HTML text and attributes."""
    return html.escape(str(value), quote=True)


def format_value(value: Any, digits: int = 4) -> str:
    """A table cell's text: floats with ``digits`` significant digits, NaN/None as ``–``."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if value != 0 and (abs(value) >= 10**digits or abs(value) < 10 ** -(digits - 1)):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v, digits) for v in value)
    return str(value)


def table(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    digits: int = 4,
    css_id: str | None = None,
) -> str:
    """An HTML ``<table class="data">`` of ``records`` (one dict per row).

    Parameters
    ----------
    records:
        The rows; a key missing from a row shows as ``–``.
    columns:
        Which keys, in order (default: every key, in order of first appearance).
    headers:
        Display names of some columns.
    digits:
        Significant digits of floats.
    css_id:
        ``id`` attribute of the table.
    """
    if columns is None:
        columns = []
        for record in records:
            columns += [key for key in record if key not in columns]
    headers = headers or {}
    attribute = f' id="{escape(css_id)}"' if css_id else ""
    parts = [f'<table class="data"{attribute}><thead><tr>']
    parts += [f"<th>{escape(headers.get(c, c))}</th>" for c in columns]
    parts.append("</tr></thead><tbody>")
    for record in records:
        cells = "".join(f"<td>{escape(format_value(record.get(c), digits))}</td>" for c in columns)
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def image_png(picture: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W)`` grey or ``(H, W, 3)`` colour array with values in ``[0, 1]``."""
    from matplotlib.image import imsave

    array = np.clip(np.asarray(picture, dtype=np.float64), 0.0, 1.0)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"a picture must be (H, W) or (H, W, 3), got shape {array.shape}")
    buffer = io.BytesIO()
    if array.ndim == 2:
        imsave(buffer, array, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    else:
        imsave(buffer, array, format="png")
    return buffer.getvalue()


def figure_png(figure: Any, dpi: int = 110) -> bytes:
    """PNG bytes of a matplotlib ``Figure`` (Agg canvas; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if figure.canvas is None or not hasattr(figure.canvas, "print_png"):
        FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def img_tag(
    png: bytes,
    alt: str,
    *,
    width: int | None = None,
    height: int | None = None,
    pixelated: bool = False,
) -> str:
    """An ``<img>`` holding ``png`` inline as a base64 ``data:`` URI."""
    data = base64.b64encode(png).decode("ascii")
    size = ""
    if width is not None:
        size += f' width="{int(width)}"'
    if height is not None:
        size += f' height="{int(height)}"'
    css = ' class="pixelated"' if pixelated else ""
    return f'<img alt="{escape(alt)}"{size}{css} src="data:image/png;base64,{data}">'


def toggle_css(ids: Sequence[str]) -> str:
    """CSS that hides the cells of class ``ids[i]`` when the checkbox ``#show-<id>`` is off.

    The checkboxes must be earlier siblings of the ``.grid-wrap`` element holding the table
    (the general sibling combinator ``~``), so no script is needed to hide a column.
    """
    return "\n".join(
        f"#show-{i}:not(:checked) ~ .grid-wrap .{i} {{ display: none; }}" for i in ids
    )


def page(title: str, body: str, *, extra_css: str = "") -> str:
    """A complete HTML5 document (UTF-8, inline style) around ``body``."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}\n{extra_css}\n</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )
