"""Wire constants of XCA/XCA-I (xca.md §1–§9), kept in one place so no codec spells a URN twice."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

# --- namespaces (xca.md §2) ---
QUERY_NS: Final = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
RIM_NS: Final = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS_NS: Final = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
XDSB_NS: Final = "urn:ihe:iti:xds-b:2007"
XDSIB_NS: Final = "urn:ihe:rad:xdsi-b:2009"

NSMAP: Final[dict[str | None, str]] = {"query": QUERY_NS, "rim": RIM_NS, "rs": RS_NS}
XDSB_NSMAP: Final[dict[str | None, str]] = {"xdsb": XDSB_NS, "rs": RS_NS}
XDSIB_NSMAP: Final[dict[str | None, str]] = {"xdsiB": XDSIB_NS, "xdsb": XDSB_NS}


class Action(StrEnum):
    """WS-Addressing actions (xca.md §1)."""

    ITI38 = "urn:ihe:iti:2007:CrossGatewayQuery"
    ITI38_RESPONSE = "urn:ihe:iti:2007:CrossGatewayQueryResponse"
    ITI39 = "urn:ihe:iti:2007:CrossGatewayRetrieve"
    ITI39_RESPONSE = "urn:ihe:iti:2007:CrossGatewayRetrieveResponse"
    RAD69 = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
    RAD69_RESPONSE = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
    RAD75 = "urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSet"
    RAD75_RESPONSE = "urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSetResponse"
    ITI18 = "urn:ihe:iti:2007:RegistryStoredQuery"
    ITI18_RESPONSE = "urn:ihe:iti:2007:RegistryStoredQueryResponse"
    ITI43 = "urn:ihe:iti:2007:RetrieveDocumentSet"
    ITI43_RESPONSE = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"


class StoredQuery(StrEnum):
    """Stored query ids (xca.md §3)."""

    FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
    FIND_DOCUMENTS_BY_REFERENCE_ID = "urn:uuid:12941a89-e02e-4be5-967c-ce4bfc8fe492"
    FIND_SUBMISSION_SETS = "urn:uuid:f26abbcb-ac74-4422-8a30-edb644bbc1a9"
    FIND_FOLDERS = "urn:uuid:958f3006-baad-4929-a4de-ff1114824431"
    GET_ALL = "urn:uuid:10b545ea-725c-446d-9b95-8aeb444eddf3"
    GET_DOCUMENTS = "urn:uuid:5c4f972b-d56b-40ac-a5fc-c8ca9b40b9d4"
    GET_FOLDERS = "urn:uuid:5737b14c-8a1a-4539-b659-e03a34a5e1e4"
    GET_ASSOCIATIONS = "urn:uuid:a7ae438b-4bc2-4642-93e9-be891f7bb155"
    GET_DOCUMENTS_AND_ASSOCIATIONS = "urn:uuid:bab9529a-4a10-40b3-a01f-f68a615d247a"
    GET_SUBMISSION_SETS = "urn:uuid:51224314-5390-4169-9b91-b1980040715a"
    GET_SUBMISSION_SET_AND_CONTENTS = "urn:uuid:e8e3cb2c-e39c-46b9-99e4-c12f57260b83"
    GET_FOLDER_AND_CONTENTS = "urn:uuid:b909a503-523d-4517-8acf-8e5834dfc4c7"
    GET_FOLDERS_FOR_DOCUMENT = "urn:uuid:10cae35a-c7f9-4cf5-b61e-fc3278ffb578"
    GET_RELATED_DOCUMENTS = "urn:uuid:d90e5407-b356-4d91-a89f-873917b4b0e6"
    FIND_DOCUMENTS_MULTI_PATIENT = "urn:uuid:3d1bdb10-39a2-11de-89c2-2f44d94eaa9f"
    FETCH = "urn:uuid:f2072993-9478-41df-a603-8f016706efe8"


class QueryParam(StrEnum):
    """Stored-query slot names (xca.md §4)."""

    PATIENT_ID = "$XDSDocumentEntryPatientId"
    STATUS = "$XDSDocumentEntryStatus"
    CLASS_CODE = "$XDSDocumentEntryClassCode"
    TYPE_CODE = "$XDSDocumentEntryTypeCode"
    PRACTICE_SETTING_CODE = "$XDSDocumentEntryPracticeSettingCode"
    HEALTHCARE_FACILITY_TYPE_CODE = "$XDSDocumentEntryHealthcareFacilityTypeCode"
    FORMAT_CODE = "$XDSDocumentEntryFormatCode"
    EVENT_CODE_LIST = "$XDSDocumentEntryEventCodeList"
    CONFIDENTIALITY_CODE = "$XDSDocumentEntryConfidentialityCode"
    CREATION_TIME_FROM = "$XDSDocumentEntryCreationTimeFrom"
    CREATION_TIME_TO = "$XDSDocumentEntryCreationTimeTo"
    SERVICE_START_TIME_FROM = "$XDSDocumentEntryServiceStartTimeFrom"
    SERVICE_START_TIME_TO = "$XDSDocumentEntryServiceStartTimeTo"
    SERVICE_STOP_TIME_FROM = "$XDSDocumentEntryServiceStopTimeFrom"
    SERVICE_STOP_TIME_TO = "$XDSDocumentEntryServiceStopTimeTo"
    AUTHOR_PERSON = "$XDSDocumentEntryAuthorPerson"
    METADATA_LEVEL = "$MetadataLevel"
    ENTRY_TYPE = "$XDSDocumentEntryType"
    REFERENCE_ID_LIST = "$XDSDocumentEntryReferenceIdList"
    ENTRY_UUID = "$XDSDocumentEntryEntryUUID"
    UNIQUE_ID = "$XDSDocumentEntryUniqueId"
    HOME_COMMUNITY_ID = "$homeCommunityId"
    TARGET_COMMUNITY_ID_LIST = "$targetCommunityIdList"


#: Slots that may be repeated (ANDed); every other slot must occur at most once (xca.md §4).
REPEATABLE_PARAMS: Final = frozenset({
    QueryParam.EVENT_CODE_LIST,
    QueryParam.CONFIDENTIALITY_CODE,
    QueryParam.REFERENCE_ID_LIST,
})
#: Parameters whose values are DTM and are sent unquoted (but accepted quoted).
TIME_PARAMS: Final = frozenset({
    QueryParam.CREATION_TIME_FROM, QueryParam.CREATION_TIME_TO,
    QueryParam.SERVICE_START_TIME_FROM, QueryParam.SERVICE_START_TIME_TO,
    QueryParam.SERVICE_STOP_TIME_FROM, QueryParam.SERVICE_STOP_TIME_TO,
})
#: Parameters whose values are a single quoted string rather than a list.
SINGLE_VALUE_PARAMS: Final = frozenset({QueryParam.PATIENT_ID, QueryParam.METADATA_LEVEL}) | TIME_PARAMS


class ReturnType(StrEnum):
    LEAF_CLASS = "LeafClass"
    OBJECT_REF = "ObjectRef"


class ResponseStatus(StrEnum):
    """xca.md §9: note that PartialSuccess lives in the IHE namespace, not OASIS'."""

    SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
    FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
    PARTIAL_SUCCESS = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"


class Severity(StrEnum):
    ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
    WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"


class ErrorCode(StrEnum):
    """RegistryError codes (xca.md §9)."""

    REGISTRY_ERROR = "XDSRegistryError"
    REGISTRY_NOT_AVAILABLE = "XDSRegistryNotAvailable"
    REGISTRY_BUSY = "XDSRegistryBusy"
    REGISTRY_OUT_OF_RESOURCES = "XDSRegistryOutOfResources"
    REPOSITORY_ERROR = "XDSRepositoryError"
    REPOSITORY_BUSY = "XDSRepositoryBusy"
    TOO_MANY_RESULTS = "XDSTooManyResults"
    UNKNOWN_PATIENT_ID = "XDSUnknownPatientId"
    RESULT_NOT_SINGLE_PATIENT = "XDSResultNotSinglePatient"
    UNKNOWN_STORED_QUERY = "XDSUnknownStoredQuery"
    STORED_QUERY_MISSING_PARAM = "XDSStoredQueryMissingParam"
    STORED_QUERY_PARAM_NUMBER = "XDSStoredQueryParamNumber"
    DOCUMENT_UNIQUE_ID_ERROR = "XDSDocumentUniqueIdError"
    UNKNOWN_REPOSITORY_ID = "XDSUnknownRepositoryId"
    MISSING_DOCUMENT = "XDSMissingDocument"
    MISSING_DOCUMENT_METADATA = "XDSMissingDocumentMetadata"
    DEPRECATED_DOCUMENT = "XDSRegistryDeprecatedDocumentError"
    UNKNOWN_COMMUNITY = "XDSUnknownCommunity"
    MISSING_HOME_COMMUNITY_ID = "XDSMissingHomeCommunityId"
    UNAVAILABLE_COMMUNITY = "XDSUnavailableCommunity"
    LOCAL_POLICY_RESTRICTION = "LocalPolicyRestrictionError"
    PATIENT_ID_DOES_NOT_MATCH = "XDSPatientIdDoesNotMatch"


class EntryStatus(StrEnum):
    APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
    DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"


class EntryType(StrEnum):
    """DocumentEntry objectType (xca.md §4, $XDSDocumentEntryType)."""

    STABLE = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
    ON_DEMAND = "urn:uuid:34268e47-fdf5-41a6-ba33-82133c465248"


class Scheme(StrEnum):
    """classificationScheme / identificationScheme UUIDs of a DocumentEntry (xca.md §6)."""

    AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
    CLASS_CODE = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
    CONFIDENTIALITY_CODE = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
    EVENT_CODE_LIST = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
    FORMAT_CODE = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
    HEALTHCARE_FACILITY_TYPE_CODE = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
    PRACTICE_SETTING_CODE = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
    TYPE_CODE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
    LIMITED_METADATA = "urn:uuid:ab9b591b-83ab-4d03-8f5d-f93b1fb92e85"
    PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
    UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"


OBJECT_TYPE_CLASSIFICATION: Final = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Classification"
OBJECT_TYPE_EXTERNAL_IDENTIFIER: Final = (
    "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:ExternalIdentifier"
)
REFERENCE_ID_LIST_SLOT: Final = "urn:ihe:iti:xds:2013:referenceIdList"
STUDY_INSTANCE_UID_ID_TYPE: Final = "urn:ihe:iti:xds:2016:studyInstanceUID"

# --- coding schemes ---
DCM_SCHEME: Final = "1.2.840.10008.2.16.4"
DICOM_UID_REGISTRY: Final = "1.2.840.10008.2.6.1"
SNOMED_CT: Final = "2.16.840.1.113883.6.96"
LOINC: Final = "2.16.840.1.113883.6.1"
HL7_CONFIDENTIALITY: Final = "2.16.840.1.113883.5.25"
IHE_RAD_FORMAT_SCHEME: Final = "1.3.6.1.4.1.19376.1.2.3"

KOS_SOP_CLASS: Final = "1.2.840.10008.5.1.4.1.1.88.59"
BASIC_TEXT_SR_SOP_CLASS: Final = "1.2.840.10008.5.1.4.1.1.88.11"
MIME_DICOM: Final = "application/dicom"

EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"

# --- imaging metadata vocabulary (project choices where xca.md §7 / netherlands.md §4 leave a gap) ---

#: DICOM Body Part Examined -> SNOMED CT anatomic region (DICOM PS3.16 Annex L, CID 4), for the
#: anatomic half of a KOS entry's eventCodeList.
BODY_PART_SNOMED: Final[dict[str, tuple[str, str]]] = {
    "HEAD": ("69536005", "Head"),
    "BRAIN": ("12738006", "Brain"),
    "NECK": ("45048000", "Neck"),
    "CHEST": ("43799004", "Chest"),
    "ABDOMEN": ("818981001", "Abdomen"),
    "PELVIS": ("816092008", "Pelvis"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "CSPINE": ("122494005", "Cervical spine"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "KNEE": ("72696002", "Knee"),
    "HAND": ("85562004", "Hand"),
    "BREAST": ("76752008", "Breast"),
}
#: Acquisition modalities (DICOM CID 29) with their display names; SR and KO are not acquisitions.
MODALITY_DISPLAY: Final[dict[str, str]] = {
    "CT": "Computed Tomography",
    "MR": "Magnetic Resonance",
    "CR": "Computed Radiography",
    "DX": "Digital Radiography",
    "US": "Ultrasound",
    "MG": "Mammography",
    "NM": "Nuclear Medicine",
    "PT": "Positron emission tomography",
    "XA": "X-Ray Angiography",
    "RF": "Radio Fluoroscopy",
}
