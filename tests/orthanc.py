"""A real Orthanc with its DICOMweb plugin for the tests, on a free loopback port.

:func:`start_orthanc` writes a configuration into a temporary folder (storage and index there too),
starts ``Orthanc CONFIG.json`` and waits until its REST API answers. The server:

- accepts HTTP connections from this machine only (``RemoteAccessAllowed: false``; Orthanc 1.10 has
  no bind-address option) and runs no DICOM (DIMSE) server;
- asks for HTTP basic authentication: ``alice`` / ``secret`` may do everything, ``bob`` / ``secret``
  is a known user whom a Lua filter forbids everything (HTTP 403), ``carol`` / ``secret`` may read
  but not store (HTTP 403 on every POST, so on STOW-RS);
- rejects (through the Lua ``ReceivedInstanceFilter``) every SEG whose PatientID is :data:`REJECTED_PATIENT`,
  so that a STOW-RS the server refuses can be tested.

Tests that need it skip, saying why, when the ``Orthanc`` binary or the DICOMweb plugin is absent.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests

USER, PASSWORD = "alice", "secret"
FORBIDDEN_USER = "bob"
READ_ONLY_USER = "carol"
REJECTED_PATIENT = "REJECT-SEG"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

_LUA = f"""
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if username == '{READ_ONLY_USER}' then
    return method == 'GET'
  end
  return username ~= '{FORBIDDEN_USER}'
end

function ReceivedInstanceFilter(dicom, origin, info)
  return not (dicom.Modality == 'SEG' and dicom.PatientID == '{REJECTED_PATIENT}')
end
"""


def orthanc_missing() -> str | None:
    """Why Orthanc cannot be started here (the skip reason), or None when it can."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not PLUGIN.exists():
        return f"the Orthanc DICOMweb plugin is not installed ({PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Orthanc:
    """A running test Orthanc: its process, its port and its folder."""

    process: subprocess.Popen
    port: int
    folder: Path

    @property
    def url(self) -> str:
        """The root of its REST API."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The root of its DICOMweb API."""
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        """One call of Orthanc's own REST API as the allowed user; raises on an HTTP error."""
        response = requests.request(method, self.url + path, auth=(USER, PASSWORD), timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files through the REST API (as a modality would send them)."""
        for path in files:
            self.rest("POST", "/instances", data=Path(path).read_bytes())

    def series_of_modality(self, modality: str) -> list[dict]:
        """Orthanc's records of every series of ``modality`` it holds."""
        return [s for s in self.rest("GET", "/series?expand").json() if s["MainDicomTags"].get("Modality") == modality]

    def instance(self, orthanc_id: str) -> pydicom.Dataset:
        """One stored instance, read back with pydicom."""
        from io import BytesIO

        return pydicom.dcmread(BytesIO(self.rest("GET", f"/instances/{orthanc_id}/file").content))

    def clear(self) -> None:
        """Delete every patient, leaving an empty server."""
        for patient in self.rest("GET", "/patients").json():
            self.rest("DELETE", f"/patients/{patient}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_orthanc(folder: Path, timeout: float = 30.0) -> Orthanc:
    """Start an Orthanc on a free loopback port with its storage in ``folder``; wait until it answers.

    Raises:
        RuntimeError: it exited or did not answer within ``timeout`` seconds (with its log's tail).
    """
    port = free_port()
    (folder / "filter.lua").write_text(_LUA)
    config = {
        "Name": "skcdf-tests", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD, FORBIDDEN_USER: PASSWORD, READ_ONLY_USER: PASSWORD},
        "DicomServerEnabled": False, "LuaScripts": [str(folder / "filter.lua")], "Plugins": [str(PLUGIN)],
        "SaveJobs": False, "ConcurrentJobs": 1, "HttpThreadsCount": 4, "StableAge": 1,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = (folder / "orthanc.log").open("w")
    process = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                               cwd=folder)
    server = Orthanc(process, port, folder)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            server.rest("GET", "/system")
            return server
        except requests.RequestException:
            time.sleep(0.1)
    server.stop()
    tail = (folder / "orthanc.log").read_text()[-2000:]
    raise RuntimeError(f"Orthanc did not start on port {port}:\n{tail}")
