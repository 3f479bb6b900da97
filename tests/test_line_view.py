"""The live view: a real AlertPublisher publishing, the view subscribed to it, read over
HTTP (state, SSE) and, where Chromium is installed, in a real headless browser."""

import json
import os
import shutil
import threading
import time
import urllib.request

import numpy as np
import pytest

from edge_runtime.line.headless import Browser, find_chromium
from edge_runtime.line.overlay import OverlayWriter, render_overlay
from edge_runtime.line.view import start_view
from test_edge_alerts import Station, record

F = float(os.environ.get("EDGE_TEST_TIME_FACTOR", "1"))
pytestmark = pytest.mark.timeout(180 * F)


def wait_until(predicate, what, seconds=20):
    end = time.monotonic() + seconds * F
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def get(url):
    with urllib.request.urlopen(url, timeout=10 * F) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def overlay_png(fid):
    rgb = np.full((90, 120, 3), 100, np.uint8)
    amap = np.zeros((90, 120), np.float32)
    amap[30:60, 50:90] = 1.0
    return render_overlay(rgb, amap, [{"bbox": [50, 30, 90, 60]}], 0.9, 0.5, "NOT_OK", fid, time.time_ns())


def test_view_follows_the_alert_channel_over_http_and_sse(tmp_path):
    writer = OverlayWriter(tmp_path / "overlays", max_files=10)
    n = {"sent": 0}

    def publish(st, fids):
        for fid in fids:
            r = record(fid, decision="NOT_OK" if fid % 3 == 0 else "OK")
            r["decision_ns"] = time.time_ns()
            if r["decision"] == "NOT_OK":
                r["heatmap"] = str(writer.write(f"st1-{fid:06d}", overlay_png(fid)))
            st.pub.publish(r)
            n["sent"] += 1
            st.tick_for(0.01)

    more = threading.Event()

    def script(st):
        st.wait_subscribed()
        publish(st, range(6))
        assert more.wait(60 * F)
        publish(st, range(6, 12))

    with Station(tmp_path, script) as st:
        with start_view("127.0.0.1:0", alerts_endpoint=st.pub_ep, station="st1") as view:
            wait_until(lambda: view.snapshot()["total"] == 6, "the first 6 records in the view")
            snap = json.loads(get(view.url + "state.json")[2])
            assert snap["counts"]["NOT_OK"] == 2 and snap["counts"]["OK"] == 4
            assert snap["latency_ms"]["infer"]["p50"] == 3.5 and snap["latest"]["frame_id"] == 5
            status, ctype, body = get(view.url + "frame")
            assert status == 200 and ctype == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
            with urllib.request.urlopen(view.url + "events", timeout=10 * F) as events:
                first = json.loads(events.readline().decode().removeprefix("data: "))
                assert first["total"] == 6
                more.set()
                while True:  # pushed as the station publishes; no polling by the page
                    line = events.readline().decode()
                    if line.startswith("data: ") and json.loads(line[6:])["total"] == 12:
                        break
            page = get(view.url)[2].decode()
            assert "id=\"counts\"" in page and "EventSource" in page and "\"total\": 12" in page


def test_view_binds_loopback_unless_allowed():
    with pytest.raises(Exception, match="reachable from the network"):
        start_view("0.0.0.0:0")
    with pytest.raises(ValueError, match="HOST:PORT"):
        start_view("8080")


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_view_in_a_real_headless_browser_counts_advance_and_shows_the_overlay(tmp_path):
    writer = OverlayWriter(tmp_path / "overlays", max_files=10)
    go = threading.Event()

    def script(st):
        st.wait_subscribed()
        for fid in range(4):
            st.pub.publish(record(fid))
            st.tick_for(0.01)
        assert go.wait(60 * F)
        for fid in range(4, 10):
            r = record(fid, decision="NOT_OK" if fid == 9 else "OK")
            r["decision_ns"] = time.time_ns()
            r["stages_ms"] = {"capture": 1.0, "preprocess": 4.0 + fid, "infer": 30.0 + fid, "alert": 2.0, "e2e": 40 + fid}
            if fid == 9:
                r["heatmap"] = str(writer.write("st1-000009", overlay_png(9)))
            st.pub.publish(r)
            st.tick_for(0.05)

    with Station(tmp_path, script) as st, start_view("127.0.0.1:0", alerts_endpoint=st.pub_ep) as view:
        wait_until(lambda: view.snapshot()["total"] == 4, "4 records")
        with Browser(1200, 640, timeout=60 * F) as browser:
            browser.navigate(view.url)
            assert browser.evaluate("document.getElementById('count-OK').textContent") == "4"
            wait_until(lambda: view.served["events"] >= 1, "the page's EventSource")
            go.set()  # published while the page is open: only server-sent events can bring these
            browser.wait_for("document.getElementById('count-OK').textContent === '9'", timeout=30 * F)
            browser.wait_for("document.getElementById('count-NOT_OK').textContent === '1'", timeout=30 * F)
            assert "part 9: NOT_OK" in browser.evaluate("document.getElementById('banner').textContent")
            browser.wait_for("document.getElementById('frame').complete && "
                             "document.getElementById('frame').naturalWidth > 0", timeout=30 * F)  # fmt: skip
            shot = tmp_path / "live_view.png"
            browser.screenshot(shot)
    assert view.served["frame"] >= 1  # the browser fetched the overlay picture
    import cv2

    img = cv2.imread(str(shot))
    red = (img[..., 2] > 180) & (img[..., 1] < 80) & (img[..., 0] < 80)
    assert img.shape[:2] == (640, 1200) and red.sum() > 500  # the NOT_OK banner and overlay header
    if os.environ.get("EDGE_SAVE_DOC_IMAGES"):
        shutil.copy(shot, os.environ["EDGE_SAVE_DOC_IMAGES"])
