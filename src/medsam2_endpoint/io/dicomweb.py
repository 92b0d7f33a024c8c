"""A DICOM series read from a PACS by DICOMweb (dicomweb-client), and a DICOM SEG stored back by STOW-RS.

Only base URLs listed in MEDSAM2_DICOMWEB_URLS are used; anything else is refused before any connection.
Every request (redirect hops included) passes io/fetch.py's address checks: a non-public address is used only
when the listed URL names it literally (`http://127.0.0.1:8042/dicom-web`) or MEDSAM2_FETCH_ALLOW_NETWORKS
exempts it; the connection then goes to the address checked (no second DNS lookup), https keeping the host name
for SNI and the certificate check. The series' size is judged from its WADO-RS metadata before any pixel is fetched; the instances
are then fetched one by one (the request's budget checked between them), written to a temporary folder and
read by the series reader every DICOM folder goes through (io/dicom_seg.py), so slices are in the same
position order as a series on disk. Credentials (bearer token, basic auth, a managed identity's token) travel
in request headers only: never in logs, errors or metadata.
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import requests

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import (
    FetchFailed,
    FetchRefused,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMedia,
)
from medsam2_endpoint.base.log import log
from medsam2_endpoint.io import fetch as fetch_module  # _CA_CERTS: certifi's, or the tests' CA
from medsam2_endpoint.io.dicom_seg import Algorithm, Segment, series_files, write_dicom_seg
from medsam2_endpoint.io.fetch import FetchPolicy, Resolver, check_url, default_resolver, redact_url
from medsam2_endpoint.io.limits import Limits, VoxelTally

URLS_SETTING = "MEDSAM2_DICOMWEB_URLS"
#: Azure Health Data Services' DICOM service: the audience of its Microsoft Entra tokens.
AZURE_DICOM_SCOPE = "https://dicom.healthcareapis.azure.com/.default"
# Single-frame cross-sectional images: what a volume can be built from.
IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image",
    "1.2.840.10008.5.1.4.1.1.128": "PET Image",
}
_TAGS = {
    "SOPClassUID": "00080016", "SOPInstanceUID": "00080018", "Rows": "00280010", "Columns": "00280011",
    "NumberOfFrames": "00280008", "BitsAllocated": "00280100", "ImagePositionPatient": "00200032",
    "ImageOrientationPatient": "00200037",
}


@dataclass(frozen=True)
class DicomwebPolicy:
    """Which DICOMweb servers may be used and how to sign in to each (filled from the MEDSAM2_DICOMWEB_* settings).

    urls: allowed base URLs, without a trailing slash. tokens / basic: base URL -> bearer token / (user, password).
    managed_identity: "" (none), "system", or a user-assigned identity's client id: servers without a token of
    their own get a Microsoft Entra token for Azure's DICOM service from it. fetch: time-outs, size cap and
    exempt networks (its host allowlist is not used: the listed URLs replace it).
    """

    urls: tuple[str, ...] = ()
    tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    basic: Mapping[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    managed_identity: str = field(default="", repr=False)
    fetch: FetchPolicy = FetchPolicy()


@dataclass(frozen=True)
class SeriesRef:
    """Where a series lives: a listed base URL and its Study and Series Instance UIDs."""

    url: str
    study: str
    series: str


@dataclass
class DicomwebSeries:
    """A fetched series: its instances as files in position order (the volume's z order), kept in a temporary
    folder until `close` (a SEG written over the series needs them)."""

    ref: SeriesRef
    files: tuple[Path, ...]
    instances: tuple[str, ...]  # SOP Instance UIDs, files' order
    folder: tempfile.TemporaryDirectory[str] | None

    def close(self) -> None:
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None


def normalise(url: str) -> str:
    return url.strip().rstrip("/")


def listed(url: str, policy: DicomwebPolicy, *, field: str) -> str:
    """The listed base URL `url` names; refused (400, naming the setting) when it is not listed. Opens nothing."""
    base = normalise(url)
    if base in policy.urls:
        return base
    shown = redact_url(base)
    if not policy.urls:
        raise FetchRefused(f"{field}: DICOMweb server {shown} refused: this endpoint lists no DICOMweb servers "
                           f"({URLS_SETTING} is empty); the operator must add its base URL to {URLS_SETTING}")
    raise FetchRefused(f"{field}: DICOMweb server {shown} refused: it is not one of the base URLs listed in {URLS_SETTING}; "
                       "give one of them exactly, or ask the operator to add it")


def _origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower().rstrip("."), parts.port or (443 if scheme == "https" else 80)


def _hop_policy(base: str, policy: DicomwebPolicy) -> FetchPolicy:
    """io/fetch's policy for one listed server: its scheme as listed, and its own address exempt when it is a literal IP."""
    parts = urllib.parse.urlsplit(base)
    exempt: tuple[str, ...] = ()
    try:
        import ipaddress

        exempt = (str(ipaddress.ip_network(parts.hostname or "")),)
    except ValueError:
        pass
    return replace(policy.fetch, allow_http=parts.scheme.lower() == "http", host_allowlist=(),
                   allow_networks=(*policy.fetch.allow_networks, *exempt))


class _PinnedAdapter(requests.adapters.HTTPAdapter):
    """Connects to the address `check_url` vetted (no second DNS lookup an attacker could answer differently),
    sending the original Host header and, for https, the original host name for SNI and the certificate check,
    as io/fetch.py does. The response keeps the original URL, so redirects are judged against it."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        pin: tuple[str, str] | None = getattr(request, "medsam2_pin", None)
        if pin is None:
            return super().send(request, *args, **kwargs)
        original = str(request.url)
        parts = urllib.parse.urlsplit(original)
        address = f"[{pin[1]}]" if ":" in pin[1] else pin[1]
        request.url = urllib.parse.urlunsplit(parts._replace(netloc=address + (f":{parts.port}" if parts.port else "")))
        request.headers["Host"] = parts.netloc
        try:
            response = super().send(request, *args, **kwargs)
        finally:
            request.url = original
        response.url = original
        return response

    def build_connection_pool_key_attributes(self, request: requests.PreparedRequest, verify: bool | str,
                                             cert: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        pin: tuple[str, str] | None = getattr(request, "medsam2_pin", None)
        if pin is not None and host_params.get("scheme") == "https":
            pool_kwargs.update(server_hostname=pin[0], assert_hostname=pin[0])
        return host_params, pool_kwargs


class _GuardedSession(requests.Session):
    """A requests session that checks every hop before it is sent: a listed server's origin, io/fetch's address
    rules, the request's budget (each socket wait cut to what is left of it), TLS verified, no proxies or .netrc."""

    def __init__(self, policy: DicomwebPolicy, *, field: str, budget: Budget | None, resolver: Resolver) -> None:
        super().__init__()
        self.trust_env = False  # no proxy or .netrc credentials from the environment
        self.max_redirects = policy.fetch.max_redirects
        self._policy, self._field, self._budget, self._resolver = policy, field, budget, resolver
        self._origins = {_origin(u): u for u in policy.urls}
        self.sent = 0
        adapter = _PinnedAdapter(max_retries=0)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        url = str(request.url)
        label = "URL" if self.sent == 0 else "request"
        base = self._origins.get(_origin(url))
        if base is None:  # a redirect to another server
            raise FetchRefused(f"{self._field}: DICOMweb {label} to {redact_url(url)} refused: not a server listed in {URLS_SETTING}")
        parts, ips = check_url(url, _hop_policy(base, self._policy), resolver=self._resolver, field=self._field,
                               label=f"DICOMweb {label}")
        host = (parts.hostname or "").strip("[]")
        if host not in ips:  # a host name: connect to the address just vetted
            request.medsam2_pin = (host, ips[0])  # type: ignore[attr-defined]
        fetch = self._policy.fetch
        read = fetch.read_timeout_s
        if self._budget is not None:
            self._budget.check(self.sent, "dicomweb_requests", advice="the PACS answers too slowly")
            left = self._budget.remaining()
            read = read if left is None else max(0.05, min(read, left))
        kwargs.update(timeout=(min(fetch.connect_timeout_s, read), read), verify=fetch_module._CA_CERTS or True, proxies={})
        self.sent += 1
        response = super().send(request, **kwargs)
        length = (response.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) > fetch.max_bytes:
            response.close()
            raise PayloadTooLarge(f"{self._field}: the PACS's answer is {length} bytes, over the {fetch.max_bytes} byte limit "
                                  "(MEDSAM2_FETCH_MAX_MB)")
        return response


class _EntraToken(requests.auth.AuthBase):
    """`Authorization: Bearer` with a Microsoft Entra token for Azure's DICOM service from the managed identity
    (azure-identity caches and renews it)."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        try:
            token = _credential(self.client_id).get_token(AZURE_DICOM_SCOPE).token
        except Exception as exc:  # azure-identity's errors may quote its endpoint's answers: only the type is shown
            raise FetchFailed(f"dicomweb: no Microsoft Entra token from the deployment's managed identity ({type(exc).__name__}); "
                              "check MEDSAM2_DICOMWEB_MANAGED_IDENTITY and the identity's role on the DICOM service") from None
        request.headers["Authorization"] = f"Bearer {token}"
        return request


@functools.lru_cache(maxsize=4)
def _credential(client_id: str) -> Any:
    from azure.identity import ManagedIdentityCredential  # only where a managed identity is configured

    # one quick retry: azure-core's default back-off (seconds, several tries) would outlive a request's budget
    return ManagedIdentityCredential(client_id=None if client_id in ("", "system") else client_id, retry_total=1,
                                     retry_backoff_factor=0.2)


def _client(base: str, policy: DicomwebPolicy, *, field: str, budget: Budget | None, resolver: Resolver) -> Any:
    from dicomweb_client.api import DICOMwebClient

    session = _GuardedSession(policy, field=field, budget=budget, resolver=resolver)
    if base in policy.tokens:
        session.headers["Authorization"] = f"Bearer {policy.tokens[base]}"
    elif base in policy.basic:
        session.auth = policy.basic[base]
    elif policy.managed_identity:
        session.auth = _EntraToken(policy.managed_identity)
    fetch = policy.fetch
    client = DICOMwebClient(base, session=session, timeout=(fetch.connect_timeout_s, fetch.read_timeout_s))
    client.set_http_retry_params(retry=False)  # a retry's back-off would outlive the request's budget
    return client


@contextmanager
def _pacs_errors(field: str, what: str, shown: str) -> Iterator[None]:
    """requests' failures as typed errors naming the PACS's answer (never its headers, URLs with queries or credentials)."""
    try:
        yield
    except ServiceError:
        raise
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        reason = (exc.response.reason or "") if exc.response is not None else ""
        answer = f"HTTP {status}{f' {reason}' if reason else ''}"
        if status == 404:
            raise NotFound(f"{field}: {what}: the PACS {shown} answered {answer}; check the study and series UIDs") from None
        hint = "; check the endpoint's DICOMweb credentials (MEDSAM2_DICOMWEB_TOKENS)" if status in (401, 403) else ""
        raise FetchFailed(f"{field}: {what}: the PACS {shown} answered {answer}{hint}", detail={"pacs_status": status}) from None
    except requests.Timeout:
        raise FetchFailed(f"{field}: {what}: the PACS {shown} did not answer in time", code="fetch_timeout") from None
    except requests.exceptions.SSLError:
        raise FetchFailed(f"{field}: {what}: TLS verification failed for {shown}; the PACS needs a valid certificate") from None
    except requests.TooManyRedirects:
        raise FetchRefused(f"{field}: {what}: too many redirects from {shown}") from None
    except (requests.RequestException, OSError, ValueError) as exc:  # connection refused, reset, a malformed answer
        raise FetchFailed(f"{field}: {what}: talking to the PACS {shown} failed ({type(exc).__name__})") from None


def _value(meta: Mapping[str, Any], keyword: str) -> list[Any]:
    return list((meta.get(_TAGS[keyword]) or {}).get("Value") or [])


def check_metadata(metadata: Sequence[Mapping[str, Any]], *, field: str, limits: Limits,
                   tally: VoxelTally | None = None) -> list[str]:
    """The SOP Instance UIDs of a series' WADO-RS metadata, once it passes every check a volume needs: single-frame
    CT/MR/PET images, all of one size and orientation, each with a position, within the voxel and byte limits."""
    if not metadata:
        raise NotFound(f"{field}: the series has no instances")
    uids, shapes, orientations = [], set(), []
    total_bytes = 0
    for k, meta in enumerate(metadata):
        sop_class = "".join(map(str, _value(meta, "SOPClassUID")))
        if sop_class not in IMAGE_CLASSES:
            raise UnsupportedMedia(f"{field}: instance {k} is not a CT, MR or PET image (SOP Class {sop_class or 'missing'}); "
                                   "give an image series, not a SEG, RTSTRUCT, report or other object")
        frames = _value(meta, "NumberOfFrames")
        if frames and int(frames[0]) > 1:
            raise UnsupportedMedia(f"{field}: instance {k} is multi-frame ({int(frames[0])} frames); give a series of single-frame images")
        uid, rows, columns = _value(meta, "SOPInstanceUID"), _value(meta, "Rows"), _value(meta, "Columns")
        position, orientation = _value(meta, "ImagePositionPatient"), _value(meta, "ImageOrientationPatient")
        missing = [name for name, v in (("SOPInstanceUID", uid), ("Rows", rows), ("Columns", columns),
                                        ("ImagePositionPatient", position), ("ImageOrientationPatient", orientation)) if not v]
        if missing or len(position) != 3 or len(orientation) != 6:
            raise UnsupportedMedia(f"{field}: instance {k} has no valid {', '.join(missing) or 'position or orientation'}; "
                                   "a volume needs each slice's size, position and orientation")
        uids.append(str(uid[0]))
        shapes.add((int(columns[0]), int(rows[0])))
        orientations.append([float(v) for v in orientation])
        bits = _value(meta, "BitsAllocated")
        total_bytes += int(rows[0]) * int(columns[0]) * max(1, int(bits[0]) if bits else 16) // 8
    if len(shapes) > 1:
        raise UnsupportedMedia(f"{field}: the series mixes slice sizes ({', '.join(f'{c}x{r}' for c, r in sorted(shapes))}); "
                               "give a series of one size")
    if not np.allclose(orientations, orientations[0], atol=1e-4):
        raise UnsupportedMedia(f"{field}: the series mixes slice orientations; give a series of parallel slices")
    if len(set(uids)) != len(uids):
        raise UnsupportedMedia(f"{field}: the series lists an instance twice")
    (columns_, rows_), = shapes
    size = (columns_, rows_, len(uids))
    if columns_ * rows_ > limits.max_slice_pixels:
        raise PayloadTooLarge(f"{field}: slices of {columns_}x{rows_} pixels are over the limit of {limits.max_slice_pixels} "
                              "(MEDSAM2_MAX_SLICE_PIXELS)")
    if math.prod(size) > limits.max_voxels:
        raise PayloadTooLarge(f"{field}: the series {list(size)} has {math.prod(size)} voxels, over the limit of "
                              f"{limits.max_voxels} (MEDSAM2_MAX_VOXELS); nothing was fetched")
    if total_bytes > limits.max_file_bytes:
        raise PayloadTooLarge(f"{field}: the series' pixels are {total_bytes} bytes, over the limit of {limits.max_file_bytes} "
                              "(MEDSAM2_MAX_FILE_MB); nothing was fetched")
    if tally is not None:
        tally.add(field, size)
    return uids


def read_dicomweb(ref: SeriesRef, policy: DicomwebPolicy, *, field: str, limits: Limits, budget: Budget | None = None,
                  tally: VoxelTally | None = None, resolver: Resolver = default_resolver) -> DicomwebSeries:
    """The series' metadata (checked), then its instances one by one, as files in position order."""
    base = listed(ref.url, policy, field=f"{field}.url")
    shown = redact_url(base)
    started = time.perf_counter()
    client = _client(base, policy, field=field, budget=budget, resolver=resolver)
    with _pacs_errors(field, f"series {ref.series} of study {ref.study}", shown):
        metadata = client.retrieve_series_metadata(ref.study, ref.series)
    uids = check_metadata(metadata, field=field, limits=limits, tally=tally)
    folder = tempfile.TemporaryDirectory(prefix="medsam2-dicomweb-")
    series = DicomwebSeries(ref, (), (), folder)
    try:
        for k, uid in enumerate(uids):
            if budget is not None:
                budget.check(k, "instances_fetched", advice="a smaller series, or a PACS closer to the endpoint")
            with _pacs_errors(field, f"instance {uid}", shown):
                ds = client.retrieve_instance(ref.study, ref.series, uid)
            _same_as_listed(ds, metadata[k], field=field)
            ds.save_as(Path(folder.name) / f"{k:05d}.dcm", enforce_file_format=True)
        files = tuple(series_files(Path(folder.name), series_uid=ref.series))
        if len(files) != len(uids):
            raise UnsupportedMedia(f"{field}: the series' {len(uids)} instances do not form one volume ({len(files)} do)")
        order = {p.name: uids[int(p.stem)] for p in Path(folder.name).iterdir()}
        series.files, series.instances = files, tuple(order[p.name] for p in files)
    except BaseException:
        series.close()
        raise
    log.info("dicomweb: read %d instances of a series from %s in %.2f s", len(uids), shown, time.perf_counter() - started)
    return series


def _same_as_listed(ds: Any, meta: Mapping[str, Any], *, field: str) -> None:
    """An instance must be what its metadata said (the size checks were made on that)."""
    for keyword in ("SOPInstanceUID", "Rows", "Columns"):
        said = _value(meta, keyword)
        if not said or str(ds.get(keyword)) != str(said[0]):
            raise UnsupportedMedia(f"{field}: the PACS sent an instance whose {keyword} differs from its metadata")
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise UnsupportedMedia(f"{field}: the PACS sent a multi-frame instance")


def store_seg(series: DicomwebSeries, labels: np.ndarray, segments: Sequence[Segment], algorithm: Algorithm,
              policy: DicomwebPolicy, *, field: str, budget: Budget | None = None,
              resolver: Resolver = default_resolver) -> dict[str, Any]:
    """Write the DICOM SEG of `labels` over the series and store it into the series' study by STOW-RS.

    Returns its {study_uid, series_uid, sop_instance_uid}; a failure does not raise: it returns
    {"error": <what failed, naming the PACS's answer>, "code": ..., and "pacs_status" where the PACS answered}.
    """
    import pydicom

    try:
        data = write_dicom_seg(labels, series.files, segments, algorithm)
        seg = pydicom.dcmread(BytesIO(data))
        uids = {"study_uid": str(seg.StudyInstanceUID), "series_uid": str(seg.SeriesInstanceUID),
                "sop_instance_uid": str(seg.SOPInstanceUID)}
        base = listed(series.ref.url, policy, field=f"{field}.url")
        shown = redact_url(base)
        client = _client(base, policy, field=field, budget=budget, resolver=resolver)
        with _pacs_errors(field, "storing the DICOM SEG (STOW-RS)", shown):
            answer = client.store_instances([seg], study_instance_uid=str(seg.StudyInstanceUID))
        failed = list(getattr(answer, "FailedSOPSequence", []) or [])
        if failed:
            reason = failed[0].get("FailureReason")
            raise FetchFailed(f"{field}: storing the DICOM SEG (STOW-RS): the PACS {shown} refused it "
                              f"(failure reason {reason})", detail={"pacs_failure_reason": reason})
    except ServiceError as exc:
        log.warning("dicomweb: the DICOM SEG was not stored: %s", exc.message)
        return {"error": exc.message, "code": exc.code, **exc.detail}
    log.info("dicomweb: stored a DICOM SEG (%d bytes) into its study on %s", len(data), shown)
    return uids


def parse_credentials(text: str, *, setting: str, parse: Callable[[str], Any] = str) -> dict[str, Any]:
    """`url=secret` pairs (comma-separated) or a JSON object {url: secret}, keys normalised; values through `parse`."""
    import json

    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            pairs = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{setting}: not a valid JSON object") from None
        if not isinstance(pairs, dict) or not all(isinstance(v, str) for v in pairs.values()):
            raise ValueError(f'{setting}: expected a JSON object {{"<base URL>": "<secret>"}}')
        items = list(pairs.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            url, sep, secret = part.partition("=")
            if not sep or not url.strip() or not secret.strip():
                raise ValueError(f"{setting}: expected <base URL>=<secret> pairs separated by commas")
            items.append((url, secret.strip()))
    return {normalise(url): parse(secret) for url, secret in items}


def parse_basic(secret: str) -> tuple[str, str]:
    user, sep, password = secret.partition(":")
    if not sep or not user:
        raise ValueError("expected <base URL>=<user>:<password>")
    return user, password
