"""DICOMweb in and out: fetch a CT series from a PACS with QIDO-RS / WADO-RS, store the SEG back with STOW-RS.

A URL names a study or a series of a DICOMweb service, e.g.
``http://host:8042/dicom-web/studies/<StudyUID>/series/<SeriesUID>``; everything before ``/studies/``
is the service root. The series is fetched with WADO-RS into a temporary folder and predicted
exactly as a folder (:func:`skcdf.predict_series.predict_dicom_series`). A study URL predicts one of its
series by the folder's rule: among its CT series (any image series for a model without CT window),
the one with the most instances, with a warning naming it when there is a choice.

HTTP goes through ``dicomweb-client`` on a ``requests`` session. Credentials come from the
environment, never from the command line (``ps`` would show them) nor from the URL:

- ``SKCDF_DICOMWEB_TOKEN``: an OAuth bearer token;
- ``SKCDF_DICOMWEB_USER`` and ``SKCDF_DICOMWEB_PASSWORD``: HTTP basic authentication;
- otherwise a netrc entry for the server's host (``~/.netrc``, or the file ``$NETRC`` names), read by requests.

Every failure of the server becomes one :class:`DicomWebError` (an :class:`~skcdf.utils.InputError`)
naming the URL and the problem; secrets are never part of a message.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests

from skcdf.dicom import read_series, warn_series_choice
from skcdf.predict_series import predict_dicom_series
from skcdf.utils import InputError

if TYPE_CHECKING:
    import SimpleITK as sitk

    from skcdf.infer import InferenceSettings, Network

__all__ = ["AccessDenied", "DicomWebError", "DicomWebLocation", "DicomWebServer", "RemoteSeries", "ServerUnreachable",
           "is_dicomweb_url", "make_session", "parse_url", "predict_url", "read_url"]

ENV_TOKEN, ENV_USER, ENV_PASSWORD = "SKCDF_DICOMWEB_TOKEN", "SKCDF_DICOMWEB_USER", "SKCDF_DICOMWEB_PASSWORD"
_CREDENTIALS_HINT = (f"set {ENV_USER} and {ENV_PASSWORD}, or {ENV_TOKEN}, or a netrc entry for the host "
                     "(see docs/inference.md, From a PACS)")
# Series that hold no image to predict: a study URL never picks them.
_NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "DOC", "REG"})
_UID = r"[0-9]+(?:\.[0-9]+)*"
_RESOURCE = re.compile(rf"^(?P<root>.*?)/studies/(?P<study>{_UID})(?:/series/(?P<series>{_UID}))?/?$")


class DicomWebError(InputError):
    """The DICOMweb server refused, failed or does not hold what was asked for; the message names the URL."""


class ServerUnreachable(DicomWebError):
    """No answer from the server (connection refused, name not resolved, time-out)."""


class AccessDenied(DicomWebError):
    """The server refused the credentials (HTTP 401) or the access (HTTP 403)."""


def is_dicomweb_url(source: object) -> bool:
    """Whether ``source`` is an ``http(s)://`` URL (a string; paths are never URLs)."""
    return isinstance(source, str) and re.match(r"^https?://", source, re.IGNORECASE) is not None


@dataclass(frozen=True)
class DicomWebLocation:
    """A DICOMweb service root, and optionally a study and a series in it."""

    root: str
    study_uid: str | None = None
    series_uid: str | None = None

    def __str__(self) -> str:
        url = self.root
        if self.study_uid:
            url += f"/studies/{self.study_uid}"
        if self.series_uid:
            url += f"/series/{self.series_uid}"
        return url


def parse_url(url: str) -> DicomWebLocation:
    """Split a DICOMweb URL into its service root, study and series.

    Raises:
        InputError: not an http(s) URL, credentials in it, or a query or fragment.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InputError(f"{url}: not an http:// or https:// URL")
    if parts.username or parts.password:
        shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        raise InputError(f"{shown}: remove the user name and password from the URL (ps and logs would show "
                         f"them); {_CREDENTIALS_HINT}")
    if parts.query or parts.fragment:
        raise InputError(f"{url}: expected SERVICE/studies/<StudyUID>[/series/<SeriesUID>] without ?query or #fragment")
    url = urlunsplit(parts).rstrip("/")
    match = _RESOURCE.match(url)
    if match is None:
        if "/studies" in parts.path or "/series" in parts.path:
            raise InputError(f"{url}: expected SERVICE/studies/<StudyUID>[/series/<SeriesUID>] with numeric UIDs")
        return DicomWebLocation(url)
    return DicomWebLocation(match["root"], match["study"], match["series"])


class _BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` on every request (set as the session's auth, so that netrc is not consulted)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


def make_session(environ: Mapping[str, str] = os.environ) -> requests.Session:
    """A requests session with the credentials of the environment (see the module's docstring).

    Raises:
        InputError: both a token and a user are set, or a user without a password.
    """
    session = requests.Session()
    token, user, password = environ.get(ENV_TOKEN), environ.get(ENV_USER), environ.get(ENV_PASSWORD)
    if token and user:
        raise InputError(f"both {ENV_TOKEN} and {ENV_USER} are set: set one of them")
    if token:
        session.auth = _BearerAuth(token)
    elif user:
        if password is None:
            raise InputError(f"{ENV_USER} is set but {ENV_PASSWORD} is not")
        session.auth = (user, password)
    # else requests reads ~/.netrc (or $NETRC) for the host, since trust_env is on
    return session


@dataclass(frozen=True)
class RemoteSeries:
    """A series as a QIDO-RS query describes it."""

    study_uid: str
    series_uid: str
    modality: str
    instances: int
    description: str = ""


def _series_of(record: Mapping[str, dict]) -> RemoteSeries:
    """A QIDO-RS series record (DICOM JSON) as a RemoteSeries."""

    def value(tag: str, default: object = "") -> object:
        values = record.get(tag, {}).get("Value") or [default]
        return values[0]

    return RemoteSeries(str(value("0020000D")), str(value("0020000E")), str(value("00080060")),
                        int(value("00201209", 0) or 0), str(value("0008103E")))


def _connection_reason(error: requests.RequestException) -> str:
    """The short reason of a connection failure (e.g. ``connection refused``), without the URL repeated."""
    if isinstance(error, requests.Timeout):
        return "no answer in time"
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
    return found[1].strip().lower() if found else "no connection"


def _http_problem(response: requests.Response) -> str:
    """``HTTP 404 Not Found`` and, for a STOW-RS reply, the failure reasons it lists."""
    try:
        reason = HTTPStatus(response.status_code).phrase
    except ValueError:
        reason = response.reason or ""
    return f"HTTP {response.status_code} {reason}".strip() + _failure_reasons(response)


def _failure_reasons(response: requests.Response) -> str:
    """``, failure reason 0x0110`` from a STOW-RS reply's FailedSOPSequence, or ''."""
    try:
        reply = pydicom.Dataset.from_json(response.json())
        codes = sorted({int(item.FailureReason) for item in reply.get("FailedSOPSequence", []) if "FailureReason" in item})
    except Exception:  # any body that is not a DICOM JSON reply: nothing to add
        return ""
    return "".join(f", failure reason 0x{code:04X}" for code in codes)


class DicomWebServer:
    """One DICOMweb service (QIDO-RS, WADO-RS, STOW-RS under one root), with the environment's credentials.

    Args:
        root: the service root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        timeout: seconds to wait for the server to connect and to answer each request.
        attempts: tries of each request that fails to connect or gets HTTP 408, 429, 503 or 504,
            waiting 1 s, then 2 s, 4 s, ... in between (dicomweb-client's back-off).
    """

    def __init__(self, root: str, timeout: float = 60.0, attempts: int = 3) -> None:
        from dicomweb_client import DICOMwebClient

        self.root = root.rstrip("/")
        try:
            self._client = DICOMwebClient(self.root, session=make_session(), timeout=timeout)
        except ValueError as exc:  # dicomweb-client's own URL check
            raise InputError(f"{self.root}: not a DICOMweb service URL ({exc})") from None
        self._client.set_http_retry_params(max_attempts=attempts, wait_exponential_multiplier=500)

    @contextlib.contextmanager
    def _answering(self, what: str) -> Iterator[None]:
        """Turn requests' errors during ``what`` (e.g. ``URL: query``) into one DicomWebError."""
        try:
            yield
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            problem = _http_problem(exc.response) if exc.response is not None else str(exc)
            if status == 401:
                raise AccessDenied(f"{what}: the server wants valid credentials ({problem}); {_CREDENTIALS_HINT}") from None
            if status == 403:
                raise AccessDenied(f"{what}: the server refuses this user access ({problem})") from None
            raise DicomWebError(f"{what}: the server answered {problem}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ServerUnreachable(f"{what}: cannot reach the DICOMweb server ({_connection_reason(exc)})") from None
        except requests.RequestException as exc:
            raise DicomWebError(f"{what}: {type(exc).__name__}: {exc}") from None

    def series(self, study_uid: str | None = None, series_uid: str | None = None,
               modality: str | None = None) -> list[RemoteSeries]:
        """The series of the server (or of one study) matching ``series_uid`` and ``modality``, by QIDO-RS."""
        filters = {key: value for key, value in (("SeriesInstanceUID", series_uid), ("Modality", modality)) if value}
        where = str(DicomWebLocation(self.root, study_uid))
        with self._answering(f"{where}: QIDO-RS query for series"):
            records = self._client.search_for_series(
                study_instance_uid=study_uid, search_filters=filters or None, get_remaining=True,
                fields=["SeriesDescription", "NumberOfSeriesRelatedInstances"])
        return [_series_of(record) for record in records]

    def resolve(self, location: DicomWebLocation, expect_ct: bool) -> RemoteSeries:
        """The one series a study or series URL names (for a study, by the folder's rule).

        Raises:
            DicomWebError: no such study or series, a study without a CT (or image) series, or the server's errors.
        """
        if location.study_uid is None:
            raise InputError(f"{location}: give a study or series URL, SERVICE/studies/<StudyUID>[/series/<SeriesUID>]")
        in_study = self.series(location.study_uid)
        if not in_study:
            raise DicomWebError(f"{location}: no such study on the server")
        if location.series_uid is not None:
            named = [s for s in in_study if s.series_uid == location.series_uid]
            if not named:
                raise DicomWebError(f"{location}: no such series in the study")
            return named[0]
        return _choose_series(location, in_study, expect_ct)

    def download(self, series: RemoteSeries, folder: Path) -> Path:
        """Fetch every instance of ``series`` by WADO-RS into ``folder`` (one file each); returns ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        where = DicomWebLocation(self.root, series.study_uid, series.series_uid)
        with self._answering(f"{where}: WADO-RS retrieval"):
            for number, instance in enumerate(self._client.iter_series(series.study_uid, series.series_uid)):
                instance.save_as(folder / f"{number:05d}.dcm")
        return folder

    def store(self, path: Path, study_uid: str | None = None) -> str:
        """Store one DICOM file by STOW-RS into its study (or the study ``study_uid``, which a server
        may refuse when it is not the instance's), and check that the server holds it now.

        Returns:
            its SeriesInstanceUID.

        Raises:
            DicomWebError: the server refused it (HTTP status and failure reasons), or answered
                success but does not list the instance afterwards (e.g. a filter dropped it).
        """
        dataset = pydicom.dcmread(path)
        study, series, instance = dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
        where = f"{DicomWebLocation(self.root, study_uid or study)}: STOW-RS of {path.name}"
        with self._answering(where):
            reply = self._client.store_instances([dataset], study_instance_uid=study_uid or study)
        failed = [int(item.get("FailureReason", 0)) for item in reply.get("FailedSOPSequence", [])]
        if failed:
            raise DicomWebError(f"{where}: the server rejected it (failure reason "
                                f"{', '.join(f'0x{code:04X}' for code in failed)}); nothing was stored")
        with self._answering(f"{where}: QIDO-RS check"):
            held = self._client.search_for_instances(study, series, search_filters={"SOPInstanceUID": instance})
        if not held:
            raise DicomWebError(f"{where}: the server answered success but does not hold the instance "
                                "(a filter of the server may have dropped it); nothing was stored")
        return str(series)


def _choose_series(location: DicomWebLocation, in_study: list[RemoteSeries], expect_ct: bool) -> RemoteSeries:
    """The series of a study that a study URL predicts: the most instances among its CT series
    (image series for a model without CT window), with the folder's warning when there is a choice."""
    kind = "CT" if expect_ct else "image"
    candidates = [s for s in in_study if (s.modality == "CT" if expect_ct else s.modality not in _NON_IMAGE_MODALITIES)]
    if not candidates:
        held = ", ".join(sorted({s.modality or "unknown" for s in in_study}))
        raise DicomWebError(f"{location}: the study has no {kind} series (it holds {held})")
    chosen = max(candidates, key=lambda s: (s.instances, s.series_uid))
    warn_series_choice(f"{location}: the study", {s.series_uid: s.instances for s in candidates}, chosen.series_uid,
                       f"choose another with --series UID (series_uid= in Python) or its URL "
                       f"{location}/series/UID")
    return chosen


def _located(url: str, series_uid: str | None) -> DicomWebLocation:
    """``url`` parsed, with ``series_uid`` (``--series``) filled in; a different series in both is refused."""
    location = parse_url(url)
    if series_uid is not None:
        if location.series_uid not in (None, series_uid):
            raise InputError(f"{url}: names series {location.series_uid}, but --series names {series_uid}")
        location = DicomWebLocation(location.root, location.study_uid, series_uid)
    return location


@contextlib.contextmanager
def fetched_series(url: str, expect_ct: bool, series_uid: str | None = None
                   ) -> Iterator[tuple[DicomWebServer, RemoteSeries, Path]]:
    """Fetch the series a study or series URL names into a temporary folder named after its
    SeriesInstanceUID; yield the server, the series and the folder, which is deleted afterwards."""
    location = _located(url, series_uid)
    server = DicomWebServer(location.root)
    series = server.resolve(location, expect_ct)
    with tempfile.TemporaryDirectory(prefix="skcdf-dicomweb-") as tmp:
        yield server, series, server.download(series, Path(tmp) / series.series_uid)


def predict_url(model: Network, url: str, output_dir: str | os.PathLike, preprocessing: Mapping,
                settings: InferenceSettings, series_uid: str | None = None, dicom_seg: bool = False,
                store: bool = False) -> list[Path]:
    """Predict the series a DICOMweb URL names, as a folder: ``output_dir/<SeriesUID>.nii.gz``, with
    ``dicom_seg`` or ``store`` also ``output_dir/<SeriesUID>.seg.dcm``; with ``store`` the SEG is then
    sent back by STOW-RS, a new series in the source study.

    Returns:
        the files written.

    Raises:
        InputError: any error of :func:`skcdf.predict_series.predict_dicom_series` (naming the URL), or a
            :class:`DicomWebError`; a STOW-RS failure says that the local files were written.
    """
    expect_ct = preprocessing.get("window") is not None
    with fetched_series(url, expect_ct, series_uid) as (server, series, folder):
        source = str(DicomWebLocation(server.root, series.study_uid, series.series_uid))
        written = predict_dicom_series(model, folder, output_dir, preprocessing, settings, series.series_uid,
                                       dicom_seg or store, source=source)
    if store:
        store_segmentation(server, written, source)
    return written


def store_segmentation(server: DicomWebServer, written: list[Path], source: str) -> str | None:
    """Send the SEG among ``written`` (if any) by STOW-RS; returns its SeriesInstanceUID, or None
    (with a warning) when no SEG was written because no organ was predicted.

    Raises:
        DicomWebError: the server's refusal, followed by what was written locally.
    """
    segs = [path for path in written if path.name.endswith(".seg.dcm")]
    if not segs:
        warnings.warn(f"{source}: no SEG to store (no organ predicted)", stacklevel=2)
        return None
    try:
        return server.store(segs[0])
    except DicomWebError as error:
        raise type(error)(f"{error}; written here: {', '.join(str(p) for p in written)}") from None


def read_url(url: str, expect_ct: bool = False, series_uid: str | None = None) -> sitk.Image:
    """The image of the series a DICOMweb URL names (fetched, read and checked as a folder by
    :func:`skcdf.dicom.read_series`, the temporary copy deleted)."""
    with fetched_series(url, expect_ct, series_uid) as (server, series, folder):
        source = str(DicomWebLocation(server.root, series.study_uid, series.series_uid))
        return read_series(folder, series.series_uid, expect_ct, source=source)[0]
