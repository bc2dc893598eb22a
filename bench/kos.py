"""KOS manifest parsing: DUO's byte walker (``dicom.kos.parse_kos``) against pydicom, by manifest size.

A transfer from an XCA community reads the study's KOS manifest before anything else. Until issue 14
``parse_kos`` was pydicom's ``dcmread`` plus a walk over the evidence: a Dataset, DataElements and
validated UIDs per referenced instance, 200-400 us each and rising with the count (a 64 MiB manifest
was minutes of CPU). The reference here is that reading, unchanged, so the ratio is measured in the
same run. The manifests are a real ``build_kos`` manifest grown with references (``sim.manifests``,
series of 1,000, ~70 bytes per reference): what a misbehaving community answers. CPU seconds of the
parsing thread; pydicom only up to ``--pydicom-max-mib`` (it takes ~30 s per 4 MiB).

Usage: python -m bench.kos [--mib 1,4,16,64] [--pydicom-max-mib 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from io import BytesIO

from pydicom import dcmread

from duo_gateway.dicom.kos import InstanceRef, KosPatient, KosStudy, build_kos, encode_part10, parse_kos
from duo_gateway.sim.manifests import grow_manifest

CT = "1.2.840.10008.5.1.4.1.1.2"


def pydicom_reading(data: bytes) -> int:
    """The pre-issue-14 reading: dcmread, then every reference of the manifest's study; the count."""
    ds = dcmread(BytesIO(data), force=True)
    study = ds.get("StudyInstanceUID")
    merged: dict[str, dict[str, str]] = {}
    for item in ds.get("CurrentRequestedProcedureEvidenceSequence") or ():
        if item.get("StudyInstanceUID") != study:
            continue
        for series in item.get("ReferencedSeriesSequence") or ():
            instances = merged.setdefault(str(series.get("SeriesInstanceUID")), {})
            for sop in series.get("ReferencedSOPSequence") or ():
                instances.setdefault(str(sop.get("ReferencedSOPInstanceUID")),
                                     str(sop.get("ReferencedSOPClassUID")))
    return sum(map(len, merged.values()))


def walker_reading(data: bytes) -> int:
    return parse_kos(data).instance_count


def cpu_seconds(read: Callable[[bytes], int], data: bytes, repeat: int) -> tuple[float, int]:
    """The best of ``repeat`` runs, in CPU seconds (the machine is shared: wall time is noisier)."""
    best, count = float("inf"), 0
    for _ in range(repeat):
        gc.collect()
        started = time.process_time()
        count = read(data)
        best = min(best, time.process_time() - started)
    return best, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", default="1,4,16,64", help="manifest sizes in MiB, comma-separated")
    parser.add_argument("--pydicom-max-mib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    refs = [InstanceRef("1.2.3.100.1", CT, f"1.2.3.100.1.{n}") for n in range(10)]
    seed = encode_part10(build_kos(refs, KosStudy("1.2.3.100"), KosPatient("999911120"),
                                   retrieve_location_uid="1.2.3.999"))
    sizes: dict[str, dict[str, float | int | None]] = {}
    print(f"{'MiB':>6} {'refs':>9} {'walker s':>9} {'us/ref':>7} {'pydicom s':>10} {'us/ref':>7} "
          f"{'speed-up':>9}")
    for mib in (float(m) for m in args.mib.split(",")):
        data = grow_manifest(seed, int(mib * 1024 * 1024))
        walker_s, count = cpu_seconds(walker_reading, data, args.repeat)
        row: dict[str, float | int | None] = {
            "bytes": len(data), "refs": count, "walker_s": round(walker_s, 4),
            "walker_us_per_ref": round(walker_s / count * 1e6, 2), "pydicom_s": None,
            "pydicom_us_per_ref": None, "speedup": None}
        if mib <= args.pydicom_max_mib:
            pydicom_s, pydicom_count = cpu_seconds(pydicom_reading, data, 1)
            assert pydicom_count == count, (pydicom_count, count)
            row.update(pydicom_s=round(pydicom_s, 3), pydicom_us_per_ref=round(pydicom_s / count * 1e6, 1),
                       speedup=round(pydicom_s / walker_s, 1))
        sizes[f"{mib:g}"] = row
        print(f"{mib:6g} {count:9d} {walker_s:9.3f} {row['walker_us_per_ref']:7.2f} "
              f"{row['pydicom_s'] if row['pydicom_s'] is not None else '-':>10} "
              f"{row['pydicom_us_per_ref'] if row['pydicom_us_per_ref'] is not None else '-':>7} "
              f"{row['speedup'] if row['speedup'] is not None else '-':>9}")
    per_ref = [float(r["walker_us_per_ref"] or 0) for r in sizes.values()]
    result = {"sizes": sizes, "walker_us_per_ref_largest_over_smallest": round(per_ref[-1] / per_ref[0], 2)}
    print("RESULT " + json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
