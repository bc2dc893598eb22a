# duo-gateway container: slim Python, non-root, config and storage as volumes.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY duo_gateway ./duo_gateway
COPY schemas ./schemas
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# dcmtk gives hospital IT echoscu/findscu inside the container for diagnosing PACS links.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dcmtk \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 duo \
 && useradd --system --uid 10001 --gid duo --home-dir /var/lib/duo --shell /usr/sbin/nologin duo \
 && mkdir -p /etc/duo /var/lib/duo && chown duo:duo /var/lib/duo
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER duo
WORKDIR /var/lib/duo
VOLUME ["/etc/duo", "/var/lib/duo"]
# HTTPS listener (XCA SOAP, TLB API, health, metrics) and the DICOM AE.
EXPOSE 8443 11112
# Liveness via /healthz on the ops listener when configured (recommended with mTLS), else the main one.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["duo-gateway", "healthcheck", "--config", "/etc/duo/duo.toml"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["duo-gateway", "serve", "--config", "/etc/duo/duo.toml"]
