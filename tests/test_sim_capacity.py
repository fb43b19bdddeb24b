"""The capacity model, queueing, finite sources, ids and options of real worker processes over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WorkerFactory, run_cli
from tests.contract import (
    call,
    check_pipelines,
    check_status_entry,
    check_status_list,
    expect_instance_id,
    expect_json,
    wait_until,
)
from tests.procs import Proc

PIPELINE = "/pipelines/object_detection/person_vehicle_bike"
FILE = {"source": {"type": "uri", "uri": "file:///videos/a.mp4"}}
HTTP_FILE = {"source": {"type": "uri", "uri": "https://example.com/b.mp4"}}
GST = {"source": {"type": "gst", "element": "videotestsrc"}}
RTSP = {"source": {"type": "uri", "uri": "rtsp://camera.local/stream1"}}


def url_of(worker: Proc) -> str:
    return str(worker.url)  # type: ignore[attr-defined]


def start(url: str, body: dict[str, Any]) -> str:
    return expect_instance_id(call("POST", url + PIPELINE, body))


def status(url: str, instance_id: str) -> dict[str, Any]:
    return check_status_entry(expect_json(call("GET", f"{url}/pipelines/status/{instance_id}")))


def frames_by_id(url: str) -> dict[str, tuple[float, float]]:
    """Each instance's frames (avg_fps x elapsed_time) and elapsed time, from one status list."""
    entries = check_status_list(expect_json(call("GET", url + "/pipelines/status")))
    return {e["id"]: (e["avg_fps"] * (e["elapsed_time"] or 0), e["elapsed_time"] or 0) for e in entries}


def current_rates(urls: list[str], seconds: float) -> dict[str, float]:
    """Frames per second over a window, per instance: independent of how long the starts took."""
    before = {url: frames_by_id(url) for url in urls}
    time.sleep(seconds)
    rates = {}
    for url in urls:
        for instance_id, (frames, elapsed) in frames_by_id(url).items():
            frames0, elapsed0 = before[url][instance_id]
            rates[instance_id] = (frames - frames0) / (elapsed - elapsed0)
    return rates


def test_streams_share_capacity_and_live_sources_are_capped(start_worker: WorkerFactory) -> None:
    """Capacity 130: four file streams run at ~32.5 fps, five at ~26; live sources at 30, files take the rest."""
    four, five, live = (url_of(start_worker("--capacity-fps", "130")) for _ in range(3))
    ids4 = [start(four, FILE) for _ in range(4)]
    ids5 = [start(five, HTTP_FILE) for _ in range(5)]
    gst, rtsp, file = (start(live, body) for body in (GST, RTSP, FILE))
    rates = current_rates([four, five, live], 1.5)  # default noise: +/-2% per tick
    for instance_id in ids4:
        assert rates[instance_id] == pytest.approx(32.5, abs=1.5)
    for instance_id in ids5:
        assert rates[instance_id] == pytest.approx(26.0, abs=1.5)
    assert rates[gst] == pytest.approx(30, abs=1.0)
    assert rates[rtsp] == pytest.approx(30, abs=1.0)
    assert rates[file] == pytest.approx(70, abs=2.0)
    for instance_id in ids4:  # the lifetime average the status reports converges on the same figure
        assert status(four, instance_id)["avg_fps"] == pytest.approx(32.5, abs=4)


def test_rates_follow_the_running_set(start_worker: WorkerFactory) -> None:
    """Current rate from two polls (frames = avg_fps x elapsed) drops from 200 to 100 when a second stream starts."""
    url = url_of(start_worker("--capacity-fps", "200", "--noise", "0"))

    def frames(instance_id: str) -> tuple[float, float]:
        entry = status(url, instance_id)
        return entry["avg_fps"] * entry["elapsed_time"], entry["elapsed_time"]

    def rate(instance_id: str, seconds: float) -> float:
        f0, t0 = frames(instance_id)
        time.sleep(seconds)
        f1, t1 = frames(instance_id)
        return (f1 - f0) / (t1 - t0)

    a = start(url, FILE)
    assert rate(a, 0.6) == pytest.approx(200, rel=0.05)
    start(url, FILE)
    assert rate(a, 0.6) == pytest.approx(100, rel=0.05)


def test_extra_starts_wait_in_queued(start_worker: WorkerFactory) -> None:
    url = url_of(start_worker("--max-running-pipelines", "2"))
    a, _b, c = (start(url, FILE) for _ in range(3))
    queued = status(url, c)
    assert queued["state"] == "QUEUED"
    assert queued["avg_fps"] == 0 and queued["start_time"] is None and queued["elapsed_time"] is None
    states = [e["state"] for e in check_status_list(expect_json(call("GET", url + "/pipelines/status")))]
    assert states == ["RUNNING", "RUNNING", "QUEUED"]
    call("DELETE", f"{url}/pipelines/{a}")
    started = wait_until(lambda: (e := status(url, c))["state"] == "RUNNING" and e, what="queued instance running")
    assert started["start_time"] is not None


def test_max_running_pipelines_from_the_environment(start_worker: WorkerFactory) -> None:
    url = url_of(start_worker(env={"MAX_RUNNING_PIPELINES": "1"}))
    a, b = start(url, FILE), start(url, FILE)
    assert status(url, a)["state"] == "RUNNING"
    queued = call("DELETE", f"{url}{PIPELINE}/{b}")  # deleting a queued instance aborts it at once
    assert expect_json(queued)["state"] == "ABORTED"
    assert status(url, b)["state"] == "ABORTED"


def test_finite_source_completes_after_its_frames(start_worker: WorkerFactory) -> None:
    url = url_of(start_worker("--capacity-fps", "400", "--noise", "0"))
    body = {"source": {"type": "uri", "uri": "file:///videos/short.mp4", "properties": {"sim-frames": 40}}}
    instance_id = start(url, body)
    done = wait_until(lambda: (e := status(url, instance_id))["state"] == "COMPLETED" and e, what="COMPLETED")
    assert done["elapsed_time"] == pytest.approx(0.1, abs=0.01)
    assert round(done["avg_fps"] * done["elapsed_time"]) == 40
    time.sleep(0.3)
    assert status(url, instance_id) == done  # frozen once stopped


def test_default_mac_is_random_locally_administered_and_fixed(start_worker: WorkerFactory) -> None:
    one, two = url_of(start_worker()), url_of(start_worker())
    ids_one = [start(one, FILE) for _ in range(3)]
    ids_two = [start(two, FILE) for _ in range(2)]
    assert len({i[-12:] for i in ids_one}) == 1 and len({i[-12:] for i in ids_two}) == 1
    assert ids_one[0][-12:] != ids_two[0][-12:]
    first_octet = int(ids_one[0][-12:-10], 16)
    assert first_octet & 0x02 and not first_octet & 0x01


def test_mac_option_as_12_hex_digits(start_worker: WorkerFactory) -> None:
    url = url_of(start_worker("--mac", "0A1B2C3D4E5F"))
    assert start(url, FILE).endswith("0a1b2c3d4e5f")


def test_pipelines_dir_option(start_worker: WorkerFactory, tmp_path: Path) -> None:
    definition = {"type": "GStreamer", "description": "test pipeline", "template": "videotestsrc ! appsink",
                  "parameters": {"type": "object", "properties": {"level": {"type": "integer", "default": 3}}}}
    (tmp_path / "audio" / "2").mkdir(parents=True)
    (tmp_path / "audio" / "2" / "pipeline.json").write_text(json.dumps(definition))
    url = url_of(start_worker("--pipelines-dir", str(tmp_path)))
    pipelines = check_pipelines(expect_json(call("GET", url + "/pipelines")))
    assert [(p["name"], p["version"], p["description"]) for p in pipelines] == [("audio", "2", "test pipeline")]
    instance_id = expect_instance_id(call("POST", url + "/pipelines/audio/2", {}))
    summary = expect_json(call("GET", f"{url}/pipelines/{instance_id}"))
    assert summary["request"]["parameters"] == {"level": 3}
    assert expect_json(call("POST", url + PIPELINE, FILE), 400) == "Invalid Pipeline or Version"


@pytest.mark.parametrize(("args", "message"), [
    (["--mac", "zz"], "not a MAC address"),
    (["--listen", "nowhere"], "HOST:PORT"),
    (["--capacity-fps", "0"], "must be > 0"),
    (["--pipelines-dir", "/nonexistent/dir"], "is not a directory"),
])
def test_bad_options_exit_2_with_a_message(args: list[str], message: str) -> None:
    result = run_cli("worker", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_pipeline_definition_exits_2(tmp_path: Path) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "pipeline.json").write_text("{not json")
    result = run_cli("worker", "--pipelines-dir", str(tmp_path))
    assert result.returncode == 2 and "broken" in result.stderr
