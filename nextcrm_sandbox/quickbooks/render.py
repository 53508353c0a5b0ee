"""QuickBooks' XML answers (any ``Accept`` other than JSON): ``to_xml`` renders an API payload as ``IntuitResponse``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from nextcrm_sandbox.quickbooks.model import _XMLNS

_ENTITY_ATTRS = ("domain", "sparse", "status")


def _xml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return escape(str(value))


def _xml_element(name: str, value: Any, out: list[str], *, entity: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, list):
        for item in value:
            _xml_element(name, item, out, entity=entity)
        return
    if not isinstance(value, dict):
        out.append(f"<{name}>{_xml_scalar(value)}</{name}>")
        return
    if name.endswith("Ref") and "value" in value:
        attrs = "".join(f" {k}={quoteattr(str(value[k]))}" for k in ("name", "type") if k in value)
        out.append(f"<{name}{attrs}>{_xml_scalar(value['value'])}</{name}>")
        return
    attr_keys = _ENTITY_ATTRS if entity else ()
    attrs = "".join(f" {k}={quoteattr(_xml_scalar(value[k]))}" for k in attr_keys if k in value)
    children: list[str] = []
    for key, child in value.items():
        if key not in attr_keys:
            _xml_element(key, child, children)
    if children:
        out.append(f"<{name}{attrs}>{''.join(children)}</{name}>")
    else:
        out.append(f"<{name}{attrs}/>")


def _xml_query_response(block: Mapping[str, Any], out: list[str]) -> None:
    attrs = "".join(f' {k}="{block[k]}"' for k in ("startPosition", "maxResults", "totalCount") if k in block)
    inner: list[str] = []
    for key, value in block.items():
        if key not in ("startPosition", "maxResults", "totalCount"):
            _xml_element(key, value, inner, entity=True)
    out.append(f"<QueryResponse{attrs}>{''.join(inner)}</QueryResponse>" if inner else f"<QueryResponse{attrs}/>")


def to_xml(payload: Mapping[str, Any]) -> bytes:
    """Render a JSON response body as Intuit's ``IntuitResponse`` XML document."""
    out: list[str] = []
    for key, value in payload.items():
        if key == "time":
            continue
        if key == "QueryResponse":
            _xml_query_response(value, out)
        elif key == "CDCResponse":
            for cdc in value:
                inner: list[str] = []
                for block in cdc.get("QueryResponse", []):
                    _xml_query_response(block, inner)
                out.append(f"<CDCResponse>{''.join(inner)}</CDCResponse>")
        elif key == "Fault":
            errors = "".join(
                f"<Error code={quoteattr(e['code'])}"
                + (f" element={quoteattr(e['element'])}" if e.get("element") else "")
                + ">"
                f"<Message>{escape(e['Message'])}</Message><Detail>{escape(e['Detail'])}</Detail></Error>"
                for e in value["Error"]
            )
            out.append(f"<Fault type={quoteattr(value['type'])}>{errors}</Fault>")
        else:
            _xml_element(key, value, out, entity=True)
    time_attr = f" time={quoteattr(payload['time'])}" if "time" in payload else ""
    doc = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        f'<IntuitResponse xmlns="{_XMLNS}"{time_attr}>{"".join(out)}</IntuitResponse>'
    )
    return doc.encode()
