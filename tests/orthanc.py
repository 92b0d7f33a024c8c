"""A real Orthanc (Debian `orthanc` + `orthanc-dicomweb`) as a plain process on a free loopback port, for the
PACS tests. Not a test module. Orthanc missing is a failure, never a skip: `make test` installs it as root."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from local_server import free_port
from medsam2_endpoint.testing.processes import answers, stop_group, wait_ready

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL = "apt-get install -y orthanc orthanc-dicomweb dicom3tools (make test does it when run as root)"


@dataclass
class Orthanc:
    url: str  # the REST root
    auth: tuple[str, str] | None
    log: Path

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"


def require(path: str | Path, what: str) -> None:
    if not Path(path).exists():
        pytest.fail(f"{what} is not installed ({path}); {INSTALL}")


@contextmanager
def running_orthanc(folder: Path, *, users: dict[str, str] | None = None, lua: str = "") -> Iterator[Orthanc]:
    """Orthanc with its DICOMweb plugin, storage in `folder`, basic auth for `users`, an optional Lua script."""
    require(ORTHANC, "Orthanc")
    require(DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin")
    port = free_port()
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "medsam2-test", "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "StorageDirectory": str(storage), "IndexDirectory": str(storage), "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {}, "HttpTimeout": 30,
    }
    if lua:
        (folder / "filter.lua").write_text(lua)
        config["LuaScripts"] = [str(folder / "filter.lua")]
    (folder / "orthanc.json").write_text(json.dumps(config))
    log_path = folder / "orthanc.log"
    auth = next(iter(users.items())) if users else None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Orthanc(f"http://127.0.0.1:{port}", auth, log_path)
    try:
        wait_ready(proc, lambda: answers(server.url + "/system", auth=auth), what="Orthanc",
                   log=lambda: log_path.read_text(errors="replace"), timeout_s=30, interval_s=0.1)
        yield server
    finally:
        stop_group(proc, timeout_s=20)


def load_series(orthanc: Orthanc, files: Sequence[Path], *, tag: str) -> tuple[str, str]:
    """POST the files into Orthanc as one series of a new study; (study UID, series UID).

    De-identified exports may leave the data set's UIDs empty (a PACS refuses them): SOP Class/Instance UIDs come
    from the file meta, Study/Series Instance UIDs are made from `tag` (the same tag, the same UIDs)."""
    study, series = generate_uid(entropy_srcs=[tag, "study"]), generate_uid(entropy_srcs=[tag, "series"])
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, str(ds.file_meta.MediaStorageSOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID = ds.get("PatientID") or "anonymous"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        requests.post(orthanc.url + "/instances", data=buffer.getvalue(), auth=orthanc.auth, timeout=30).raise_for_status()
    return study, series
