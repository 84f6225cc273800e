"""`skcdf watch`: segment each new CT series of a DICOMweb server and store its SEG back, for a department.

Every ``interval`` seconds the watcher lists the server's CT series by QIDO-RS. A series not yet in
the state file is taken once its number of instances has stayed the same for ``settle`` seconds
(a series still arriving from the scanner is left alone; ``settle=0`` takes it at once), fetched by
WADO-RS, predicted as ``skcdf predict URL --store`` does, and its SEG stored back by STOW-RS.

The state file (JSON, written atomically after each series) records every series handled, with its
outcome: ``stored`` (and the SEG's series UID), ``no organ`` (nothing to store) or ``failed`` (and
why). A restart reads it, so no series is done twice; since each poll lists all CT series, none is
missed while the watcher was down. A failed series is not retried: delete its entry to retry it.

A bad series (unreadable, missing slices, refused by the server's STOW-RS, or any other error of its
own) is logged and recorded, and the watcher goes on. An unreachable server is logged and tried
again at the next poll; refused credentials (HTTP 401/403) stop the watcher, since they would not
change by themselves.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from skcdf.dicomweb import (AccessDenied, DicomWebLocation, DicomWebServer, RemoteSeries, ServerUnreachable,
                            parse_url, store_segmentation)
from skcdf.predict import predict_dicom_series
from skcdf.segmenter import Segmenter
from skcdf.utils import InputError, atomic_write_text

__all__ = ["WatchState", "Watcher", "stderr_log"]


def stderr_log(message: str) -> None:
    """One timestamped line on standard error (the watcher's default log)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=sys.stderr, flush=True)


@dataclass
class WatchState:
    """The series handled so far, by SeriesInstanceUID, kept in a JSON file.

    Attributes:
        path: the state file.
        series: ``uid -> {"study", "status", "seg_series" | "message", "time"}``.
    """

    path: Path
    series: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "WatchState":
        """The state in ``path``; empty when the file does not exist yet.

        Raises:
            InputError: the file exists but is not a state file.
        """
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            series = data["series"]
            if not isinstance(series, dict):
                raise TypeError("series is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: not a watch state file ({type(exc).__name__}: {exc}); move it away to start afresh") from None
        return cls(path, series)

    def record(self, series: RemoteSeries, status: str, **details: str) -> None:
        """Record the outcome of ``series`` and save the file."""
        self.series[series.series_uid] = {"study": series.study_uid, "status": status, **details,
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(self.path, json.dumps({"series": self.series}, indent=1) + "\n")


class Watcher:
    """Polls one DICOMweb server and segments its new CT series.

    Args:
        segmenter: the model and its settings.
        url: the DICOMweb service root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        state: where the series handled are recorded.
        settle: seconds a new series' instance count must stay unchanged before it is taken.
        output_dir: also keep ``<SeriesUID>.nii.gz`` and ``.seg.dcm`` here (default: nothing kept).
        log: where progress lines go (default: timestamped lines on standard error).
        clock: seconds, monotonic (tests may replace it).
    """

    def __init__(self, segmenter: Segmenter, url: str, state: WatchState, settle: float = 30.0,
                 output_dir: str | Path | None = None, log: Callable[[str], None] = stderr_log,
                 clock: Callable[[], float] = time.monotonic) -> None:
        location = parse_url(url)
        if location.study_uid is not None:
            raise InputError(f"{url}: give the DICOMweb service root (e.g. http://HOST:8042/dicom-web), not a study")
        self.segmenter, self.state, self.settle = segmenter, state, settle
        self.server = DicomWebServer(location.root)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.log, self.clock = log, clock
        self._seen: dict[str, tuple[int, float]] = {}  # new series: (instances, since when)
        self.failures = 0

    def poll(self) -> int:
        """One pass: take every new, settled CT series. Returns how many were handled.

        Raises:
            ServerUnreachable: the server did not answer (the series in progress is not recorded).
            AccessDenied: the server refused the credentials.
        """
        handled = 0
        for series in self.server.series(modality="CT"):
            if series.series_uid in self.state.series or not self._settled(series):
                continue
            self._handle(series)
            handled += 1
        return handled

    def _settled(self, series: RemoteSeries) -> bool:
        """Whether ``series`` has shown the same number of instances for ``settle`` seconds."""
        if self.settle <= 0:
            return True
        now = self.clock()
        count, since = self._seen.get(series.series_uid, (-1, now))
        if count != series.instances:
            self._seen[series.series_uid] = (series.instances, now)
            return False
        return now - since >= self.settle

    def _handle(self, series: RemoteSeries) -> None:
        """Predict one series, store its SEG and record the outcome; its own errors are logged, not raised."""
        where = str(DicomWebLocation(self.server.root, series.study_uid, series.series_uid))
        self.log(f"{where}: new CT series ({series.instances} instances), predicting")
        try:
            status, details = self._predict_and_store(series, where)
        except (ServerUnreachable, AccessDenied):
            raise
        except Exception as exc:  # a bad series must not stop the department's watcher
            message = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            self.failures += 1
            self.log(f"failed: {message}")
            self.state.record(series, "failed", message=message)
            return
        self.state.record(series, status, **details)
        self.log(f"{where}: {status}" + (f" as SEG series {details['seg_series']}" if "seg_series" in details else ""))

    def _predict_and_store(self, series: RemoteSeries, where: str) -> tuple[str, dict[str, str]]:
        """Fetch, predict, write and store; ``("stored", {"seg_series": uid})`` or ``("no organ", {})``."""
        with tempfile.TemporaryDirectory(prefix="skcdf-watch-") as tmp:
            folder = self.server.download(series, Path(tmp) / series.series_uid)
            output_dir = self.output_dir or Path(tmp) / "out"
            seg = self.segmenter
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the one warning here, no organ predicted, is the "no organ" status
                written = predict_dicom_series(seg.network, folder, output_dir, seg.preprocessing, seg.settings,
                                               series.series_uid, dicom_seg=True, source=where)
                seg_series = store_segmentation(self.server, written, where)
        return ("no organ", {}) if seg_series is None else ("stored", {"seg_series": seg_series})

    def run(self, interval: float = 10.0, max_polls: int | None = None) -> int:
        """Poll every ``interval`` seconds, ``max_polls`` times (None: until interrupted).

        Returns:
            how many series failed, plus how many polls found the server unreachable, during this run.

        Raises:
            AccessDenied: the server refused the credentials.
        """
        polls = unreachable = 0
        self.log(f"watching {self.server.root} for new CT series (state: {self.state.path}, "
                 f"{len(self.state.series)} series done before)")
        while max_polls is None or polls < max_polls:
            if polls:
                time.sleep(interval)
            polls += 1
            try:
                handled = self.poll()
            except ServerUnreachable as error:
                unreachable += 1
                self.log(f"{error}; trying again in {interval:g} s")
                continue
            if handled == 0 and max_polls is not None:
                self.log("no new CT series")
        return self.failures + unreachable
