"""Generated studies shaped for particular tests."""

from __future__ import annotations

import copy
import dataclasses

from pydicom.uid import generate_uid

from duo_gateway.sim.studies import GeneratedStudy


def big_study(template: GeneratedStudy, count: int) -> GeneratedStudy:
    """``count`` copies of one image in one series of a new study: a study big enough to stream."""
    study_uid, series_uid = generate_uid(), generate_uid()
    instances = []
    for number in range(1, count + 1):
        ds = copy.deepcopy(template.instances[0])
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        instances.append(ds)
    return dataclasses.replace(template, study_instance_uid=str(study_uid), instances=instances)
