/*
 * Shows one instance of a study from a DICOMweb server the way a web viewer does: QIDO-RS to find a
 * series and instance when the query string does not name them, WADO-RS series metadata for the
 * header, then the pixels through cornerstone's `wadors:` image loader (WADO-RS frames).
 *
 * The page signals the outcome on body[data-state] ("rendered" once cornerstone has drawn the image,
 * "error: <reason>" otherwise) and never retries: a test reads one deterministic answer.
 */
(function () {
  "use strict";

  const DICOM_JSON = "application/dicom+json";
  const NOT_IMAGES = new Set(["SR", "KO", "PR", "DOC"]);
  const TAG = {
    modality: "00080060",
    seriesInstanceUid: "0020000E",
    sopInstanceUid: "00080018",
    seriesNumber: "00200011",
    instanceNumber: "00200013",
  };

  function setState(state) {
    // The first outcome wins: a late stray error must not turn a rendered page into a failed one.
    if (document.body.dataset.state === "loading") {
      document.body.dataset.state = state;
    }
  }

  function first(element, tag) {
    const attribute = element[tag];
    return attribute && attribute.Value && attribute.Value.length ? attribute.Value[0] : undefined;
  }

  /* QIDO answers in no promised order; a viewer shows the lowest-numbered series and image first. */
  function lowestBy(elements, tag) {
    const number = (element) => {
      const value = Number(first(element, tag));
      return Number.isFinite(value) ? value : Number.POSITIVE_INFINITY;
    };
    return elements.slice().sort((a, b) => number(a) - number(b))[0];
  }

  async function dicomJson(url) {
    const response = await fetch(url, { headers: { Accept: DICOM_JSON } });
    if (response.status === 204) {
      return []; // QIDO-RS before PS3.18 2019: "no matches" as 204 No Content
    }
    if (!response.ok) {
      throw new Error(`HTTP ${response.status} from ${url}`);
    }
    return response.json();
  }

  function describe(error) {
    if (error instanceof Error) {
      return error.message;
    }
    // cornerstone's loaders reject with {error: XMLHttpRequest, request, ...}, not an Error
    if (error && error.error && typeof error.error.status === "number") {
      return `HTTP ${error.error.status} from ${error.error.responseURL || "the image loader"}`;
    }
    try {
      return JSON.stringify(error);
    } catch (_) {
      return String(error);
    }
  }

  async function show() {
    const params = new URLSearchParams(window.location.search);
    const study = params.get("study");
    if (!params.get("root") || !study) {
      throw new Error("the query string needs root and study");
    }
    const root = new URL(params.get("root"), window.location.href).href.replace(/\/+$/, "");
    const studyUrl = `${root}/studies/${encodeURIComponent(study)}`;

    let series = params.get("series");
    let instance = series ? params.get("instance") : null;
    if (!series) {
      // a report, key object or presentation state has no frames to show
      const found = (await dicomJson(`${studyUrl}/series`))
        .filter((element) => !NOT_IMAGES.has(first(element, TAG.modality)));
      if (!found.length) {
        throw new Error(`QIDO-RS found no image series in study ${study}`);
      }
      series = first(lowestBy(found, TAG.seriesNumber), TAG.seriesInstanceUid);
    }
    const seriesUrl = `${studyUrl}/series/${encodeURIComponent(series)}`;
    if (!instance) {
      const found = await dicomJson(`${seriesUrl}/instances`);
      if (!found.length) {
        throw new Error(`QIDO-RS found no instance in series ${series}`);
      }
      instance = first(lowestBy(found, TAG.instanceNumber), TAG.sopInstanceUid);
    }

    // Series-level metadata, as viewers fetch it (one request for every image they will show)
    const metadata = await dicomJson(`${seriesUrl}/metadata`);
    const header = metadata.find((element) => first(element, TAG.sopInstanceUid) === instance);
    if (!header) {
      throw new Error(`instance ${instance} is not in the metadata of series ${series}`);
    }

    cornerstoneWADOImageLoader.external.cornerstone = cornerstone;
    cornerstoneWADOImageLoader.external.dicomParser = dicomParser;
    const imageId = `wadors:${seriesUrl}/instances/${encodeURIComponent(instance)}/frames/1`;
    cornerstoneWADOImageLoader.wadors.metaDataManager.add(imageId, header);
    document.body.dataset.imageId = imageId;

    const element = document.getElementById("viewport");
    cornerstone.enable(element);
    const image = await cornerstone.loadAndCacheImage(imageId);
    await new Promise((resolve) => {
      element.addEventListener(cornerstone.EVENTS.IMAGE_RENDERED, resolve, { once: true });
      cornerstone.displayImage(element, image);
    });
    setState("rendered");
  }

  window.addEventListener("error", (event) => setState(`error: ${event.message}`));
  window.addEventListener("unhandledrejection", (event) => setState(`error: ${describe(event.reason)}`));
  show().catch((error) => setState(`error: ${describe(error)}`));
})();
