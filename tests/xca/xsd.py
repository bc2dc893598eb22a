"""Validation against the official IHE/OASIS schemas (loaded from ../shared, never copied in)."""

from __future__ import annotations

import functools
from pathlib import Path

from lxml import etree

from duo_gateway.xca.codes import QUERY_NS, XDSB_NS, XDSIB_NS

_XS = "http://www.w3.org/2001/XMLSchema"


@functools.cache
def ihe_schema(wsdl_dir: Path) -> etree.XMLSchema:
    """One schema set over query.xsd, IHEXDSB.xsd and IHEXDSIB.xsd."""
    imports = {
        QUERY_NS: wsdl_dir / "schema" / "ebRS30" / "query.xsd",
        XDSB_NS: wsdl_dir / "schema" / "IHE" / "IHEXDSB.xsd",
        XDSIB_NS: wsdl_dir / "schema" / "IHE" / "IHEXDSIB.xsd",
    }
    root = etree.Element(f"{{{_XS}}}schema", nsmap={"xs": _XS})
    for ns, path in imports.items():
        etree.SubElement(root, f"{{{_XS}}}import", namespace=ns, schemaLocation=path.resolve().as_uri())
    return etree.XMLSchema(root)


def assert_valid(wsdl_dir: Path, el: etree._Element) -> None:
    schema = ihe_schema(wsdl_dir)
    # A standalone copy, so the verdict does not depend on the element's SOAP parents.
    doc = etree.ElementTree(etree.fromstring(etree.tostring(el)))
    if not schema.validate(doc):
        raise AssertionError("XSD validation failed:\n" + str(schema.error_log))
