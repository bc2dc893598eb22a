"""QIDO-RS search requests (PS3.18 8.3.4, 10.6): the query string parsed, and matched in memory.

Why DUO matches itself instead of handing the query to a PACS: the studies a view may show come from
several sources (C-FIND answers, instances already received) and the view's capability URL must never
see more than those, so the search runs over the attributes the server keeps per study, series and
instance. The rules are PS3.4 C.2.2.2's, which every PACS a viewer knows applies: what a viewer sends to
a PACS must find the same studies here.

A request is checked whole when parsed (a bad key, a wildcard in a UID, a malformed date range is a 400
with a reason), so :func:`matches` never fails halfway through a result list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Literal

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

Level = Literal["study", "series", "instance"]


class QidoError(ValueError):
    """The request is wrong; ``str(exc)`` is the detail for a 400 answer."""


@dataclass(frozen=True)
class QidoQuery:
    level: Level
    matches: tuple[tuple[int, str], ...]   # (tag, value as sent) of each match key
    include_all: bool                      # includefield=all
    include: frozenset[int]                # extra return tags from includefield
    limit: int | None
    offset: int
    fuzzy: bool                            # fuzzymatching=true (accepted, not applied)


def _tags(*keywords: str) -> frozenset[int]:
    found = {keyword: tag_for_keyword(keyword) for keyword in keywords}
    return frozenset(tag for tag in found.values() if tag is not None)


#: PS3.18 Table 10.6.3-3: what a study-level search returns without includefield.
STUDY_RETURN_TAGS: Final = _tags(
    "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
    "ModalitiesInStudy", "ReferringPhysicianName", "TimezoneOffsetFromUTC", "RetrieveURL", "PatientName",
    "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
#: PS3.18 Table 10.6.3-4 (series). A search for series outside one study also returns the study's
#: attributes (10.6.3.3): the caller, which knows the resource, adds STUDY_RETURN_TAGS then.
SERIES_RETURN_TAGS: Final = _tags(
    "SpecificCharacterSet", "Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "RetrieveURL",
    "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "RequestAttributesSequence")
#: PS3.18 Table 10.6.3-5 (instances); outside a series the caller adds the series' and study's too.
INSTANCE_RETURN_TAGS: Final = _tags(
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
    "TimezoneOffsetFromUTC", "RetrieveURL", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
    "NumberOfFrames")
_RETURN_TAGS: Final[dict[str, frozenset[int]]] = {
    "study": STUDY_RETURN_TAGS, "series": SERIES_RETURN_TAGS, "instance": INSTANCE_RETURN_TAGS}

#: PS3.18 8.3.3.1/8.3.3.2 let any request carry its Accept and charset in the query string; the route
#: negotiates them, so a search accepts and leaves them.
_NEGOTIATION_PARAMS: Final = frozenset({"accept", "charset"})
_NUMBER_VRS: Final = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV",
                                "US or SS"})
_BINARY_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW",
                                "US or SS or OW"})
#: Text whose backslash is a character, not a value delimiter (PS3.5 6.2).
_TEXT_VRS: Final = frozenset({"LT", "ST", "UT", "UR"})
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_DA = r"\d{8}"
_TM = r"\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?"
_DT = r"\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?(?:[+-](?:0\d|1[0-4])[0-5]\d)?"
_DATE_PATTERNS: Final = {"DA": _DA, "TM": _TM, "DT": _DT}
_PARTIAL: Final = {"DA": "00000000", "TM": "000000.000000", "DT": "00000000000000.000000"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_COUNT = re.compile(r"\d{1,18}", re.ASCII)

_Matcher = Callable[[DataElement | None], bool]


def parse_qido(params: Sequence[tuple[str, str]], level: Level, *, max_limit: int = 1000) -> QidoQuery:
    """The search a QIDO-RS query string asks for (``params`` URL-decoded, in order, repeats kept).

    Match keys are attribute keywords or 8-hex-digit tags; sequence paths (``00400275.00401001``) are
    refused rather than ignored, since ignoring a key would widen the answer. A limit above
    ``max_limit`` is capped, as PS3.18 8.3.4.4 lets a server do (it then says so in a Warning header).
    """
    if level not in _RETURN_TAGS:
        raise ValueError(f"unknown QIDO-RS level {level!r}")
    keys: list[tuple[int, str]] = []
    include: set[int] = set()
    include_all = False
    counts: dict[str, int] = {}
    fuzzy: bool | None = None
    for name, value in params:
        if name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item == "all":
                    include_all = True
                else:
                    include.add(_attribute(item, "includefield"))
        elif name in ("limit", "offset"):
            if name in counts:
                raise QidoError(f"{name} given more than once")
            if not _COUNT.fullmatch(value) or (name == "limit" and int(value) == 0):
                raise QidoError(f"{name} must be a {'positive' if name == 'limit' else 'non-negative'} "
                                f"integer, not {value!r}")
            counts[name] = int(value)
        elif name == "fuzzymatching":
            if fuzzy is not None:
                raise QidoError("fuzzymatching given more than once")
            if value not in ("true", "false"):
                raise QidoError(f"fuzzymatching must be true or false, not {value!r}")
            fuzzy = value == "true"
        elif name in _NEGOTIATION_PARAMS:
            continue
        else:
            tag = _attribute(name, "query key")
            if any(tag == seen for seen, _ in keys):
                raise QidoError(f"match key {name} given more than once")
            _matcher(tag, value)  # refuses a value the attribute cannot be matched with
            keys.append((tag, value))
    limit = counts.get("limit")
    return QidoQuery(level=level, matches=tuple(keys), include_all=include_all, include=frozenset(include),
                     limit=None if limit is None else min(limit, max_limit), offset=counts.get("offset", 0),
                     fuzzy=bool(fuzzy))


def matches(query: QidoQuery, ds: Dataset) -> bool:
    """Whether ``ds`` answers every match key of ``query`` (PS3.4 C.2.2.2).

    Single values are case-sensitive, except person names, which match case-insensitively as most
    archives do; ``*`` and ``?`` are wildcards except in UIDs, dates, times and numbers; DA/TM/DT take
    ranges (``20200101-``, ``-20201231``, ``20200101-20201231``), a TM or DT to its given precision
    (``1030`` is the minute), time zone offsets not applied; a UID key takes a comma-separated list; a
    multi-valued attribute matches when one of its values does. An attribute ``ds`` lacks, or has
    empty, matches only universal matching: an empty key, or ``*`` alone.
    """
    return all(_matcher(tag, value)(ds.get(tag)) for tag, value in query.matches)


def return_tags(query: QidoQuery) -> frozenset[int] | None:
    """The attributes each result carries: the level's required ones (Retrieve URL's value is the
    caller's to add), the match keys and includefield's; None (everything) for includefield=all."""
    if query.include_all:
        return None
    return _RETURN_TAGS[query.level] | {tag for tag, _ in query.matches} | query.include


def _attribute(name: str, what: str) -> int:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        tag = int(name, 16)
    elif "." in name:
        raise QidoError(f"{what} {name!r}: sequence attribute paths are not supported")
    else:
        # pydicom's dictionary has an entry with an empty keyword: "" must not find it
        found = tag_for_keyword(name) if name.isascii() and name.isalnum() else None
        if found is None:
            raise QidoError(f"{what} {name!r} is not a DICOM attribute keyword or tag")
        tag = found
    try:
        dictionary_VR(tag)
    except KeyError:
        raise QidoError(f"{what} {name!r} is not a standard DICOM attribute") from None
    return tag


@lru_cache(maxsize=1024)
def _matcher(tag: int, value: str) -> _Matcher:
    """The test one match key applies, built once per (tag, value): a search runs it over every result.
    QidoError when the value does not fit the attribute's VR."""
    vr = dictionary_VR(tag)
    name = f"{tag:08X}"
    if value == "":
        return _universal
    if vr == "SQ":
        raise QidoError(f"{name} is a sequence: only an empty value (return key) is supported")
    if vr in _BINARY_VRS:
        raise QidoError(f"{name} has binary values and cannot be matched")
    if vr == "UI":
        uids = value.split(",")
        for uid in uids:
            if "*" in uid or "?" in uid:
                raise QidoError(f"{name}: wildcards are not allowed in UIDs")
            if len(uid) > 64 or not _UID.fullmatch(uid):
                raise QidoError(f"{name}: {uid!r} is not a UID")
        return _any_value(frozenset(uids).__contains__, lambda v: str(v).strip(" \0"))
    if vr in _DATE_PATTERNS:
        return _any_value(_range(name, vr, value), lambda v: _normal(vr, str(v))[0])
    if vr in _NUMBER_VRS:
        if not _NUMBER.fullmatch(value):
            raise QidoError(f"{name}: {value!r} is not a number")
        wanted = float(value)
        return _any_value(lambda v: v == wanted, _number)
    if vr == "AT":
        if not re.fullmatch(r"[0-9A-Fa-f]{8}", value):
            raise QidoError(f"{name}: {value!r} is not an attribute tag")
        at = int(value, 16)
        return _any_value(lambda v: v == at, int)
    if vr not in _TEXT_VRS and "\\" in value:  # several values: any one of them (ModalitiesInStudy=CT\MR)
        tests = [_text(vr, part) for part in value.split("\\")]
        return _any_value(lambda v: any(test(v) for test in tests), lambda v: v)
    if set(value) == {"*"}:  # "*" alone is universal matching (PS3.4 C.2.2.2.3)
        return _universal
    return _any_value(_text(vr, value), lambda v: v)


def _universal(elem: DataElement | None) -> bool:
    return True


def _any_value(test: Callable[[Any], bool], convert: Callable[[Any], Any]) -> _Matcher:
    def match(elem: DataElement | None) -> bool:
        if elem is None or elem.is_empty:
            return False
        values = elem.value if elem.VM > 1 else [elem.value]
        return any(test(convert(v)) for v in values if v is not None and v != "")
    return match


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(vr: str, value: str) -> Callable[[Any], bool]:
    """Single value or wildcard matching of one string value; PN also against each component group, so
    ``Yamada*`` finds ``Yamada^Tarou=山田^太郎``."""
    flags = re.DOTALL | (re.IGNORECASE if vr == "PN" else 0)
    pattern = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value),
                         flags)

    def test(candidate: Any) -> bool:
        text = str(candidate).rstrip(" ") if vr in _TEXT_VRS else str(candidate).strip(" ")
        if vr == "PN":
            groups = (candidate if isinstance(candidate, PersonName) else PersonName(text)).components
            return any(pattern.fullmatch(g) for g in (text, *groups))
        return pattern.fullmatch(text) is not None
    return test


def _normal(vr: str, value: str, *, fill: str = "0") -> tuple[str, str]:
    """A DA/TM/DT value as fixed-width text that sorts in time order, and its offset (kept apart: not
    applied, as archives compare local times). Missing digits take ``fill``: 0 for a lower bound and a
    stored value, 9 for an upper bound, which puts it after every time it covers."""
    value = value.strip()
    if vr != "DT":  # the ACR-NEMA forms some old archives still answer with: 10:30:00, 2020.01.31
        value = value.replace(":" if vr == "TM" else ".", "")
    offset = ""
    if vr == "DT" and len(value) > 4 and value[-5] in "+-":
        value, offset = value[:-5], value[-5:]
    full = _PARTIAL[vr]
    if "." in full:
        whole, _, fraction = value.partition(".")
        width = full.index(".")
        whole = whole + fill * (width - len(whole))
        fraction = fraction + fill * (len(full) - width - 1 - len(fraction))
        return f"{whole}.{fraction}", offset
    return value + fill * (len(full) - len(value)), offset


def _range(name: str, vr: str, value: str) -> Callable[[str], bool]:
    """Range or single value matching of a DA/TM/DT key (PS3.4 C.2.2.2.5), as a test of a normalised
    stored value. A single TM or DT value is the range its precision spans."""
    pattern = _DATE_PATTERNS[vr]
    if re.fullmatch(pattern, value, re.ASCII):
        low, high = value, value
    else:
        found = re.fullmatch(f"({pattern})?-({pattern})?", value, re.ASCII)
        if found is None or value == "-":
            raise QidoError(f"{name}: {value!r} is neither a {vr} value nor a range of them")
        low, high = found.group(1) or "", found.group(2) or ""
    lower = _normal(vr, low)[0] if low else ""
    upper = _normal(vr, high, fill="9")[0] if high else ""
    if lower and upper and lower > upper:
        raise QidoError(f"{name}: the range {value!r} ends before it starts")
    return lambda stored: (not lower or stored >= lower) and (not upper or stored <= upper)
