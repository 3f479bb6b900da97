"""``edge-run``: arguments, model store, demo-bundle orchestration, a full CLI run, SIGTERM."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.cli import run as cli
from edge_runtime.errors import BundleError
from edge_runtime.pipeline import store
from edge_runtime.methods.base import Demo
from pipeline_fixtures import ANY_PORT, noop_bundle, scaled

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def model_store(tmp_path, monkeypatch) -> Path:
    """An empty model store in tmp_path (EDGE_MODEL_STORE), runtime home beside it."""
    monkeypatch.setenv("EDGE_RUNTIME_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGE_MODEL_STORE", str(tmp_path / "models"))
    return tmp_path / "models"


def test_store_locations_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGE_MODEL_STORE", raising=False)
    monkeypatch.setenv("EDGE_RUNTIME_HOME", str(tmp_path / "h"))
    assert store.store_dir() == tmp_path / "h" / "models"
    monkeypatch.setenv("EDGE_MODEL_STORE", str(tmp_path / "m"))
    assert store.store_dir() == tmp_path / "m" and store.runtime_home() == tmp_path / "h"


def test_resolve_model_by_path_and_by_store_name(model_store, tmp_path):
    by_path = noop_bundle(tmp_path / "anywhere" / "b1")
    assert store.resolve_model(str(by_path)) == by_path
    named = noop_bundle(model_store / "line3")
    assert store.resolve_model("line3") == named and store.list_models() == ["line3"]
    with pytest.raises(BundleError, match=r"unknown model 'nope'.*has: line3.*cfm-tiny"):
        store.resolve_model("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not a model bundle"):
        store.resolve_model(str(tmp_path / "empty"))


def test_bundle_info_reports_name_hash_and_calibration(tmp_path):
    info = store.bundle_info(noop_bundle(tmp_path / "b"))
    assert info["model"] == "cfm-noop-test" and len(info["bundle_hash"]) == 64 and info["calibrated"] is True
    assert store.bundle_info(noop_bundle(tmp_path / "u", thresholds=None))["calibrated"] is False


def _fake_tool(calls):
    """Stand-in for the edge-train / edge-calibrate subprocesses: writes what they would."""

    def run_tool(cmd, what, log):
        calls.append(what)
        args = dict(zip(cmd[3::2], cmd[4::2]))
        if what == "edge-train":
            out = Path(args["--out"])
            out.mkdir(parents=True)
            weights = b"weights"
            (out / "model.safetensors").write_bytes(weights)
            files = {"model.safetensors": {"sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)}}
            (out / "manifest.json").write_text(json.dumps({
                "schema_version": 1, "method": "cfm", "variant": "tiny", "config": {}, "files": files,
                "thresholds": None, "training": {"category": args["--category"]}}))
        else:
            from edge_runtime.bundle import update_manifest

            update_manifest(args["--model"], thresholds={"image": 0.3, "pixel": 0.2})

    return run_tool


def test_demo_bundle_is_built_once_atomically_and_labelled(model_store, monkeypatch):
    calls, generated, commands = [], [], []
    tool = _fake_tool(calls)
    monkeypatch.setattr(store, "_run_tool", lambda cmd, what, log: commands.append(cmd) or tool(cmd, what, log))
    monkeypatch.setattr("edge_runtime.data.synth.generate_dataset",
                        lambda out, **kw: generated.append(kw) or Path(out).mkdir(parents=True))
    logs = []
    path = store.resolve_model("cfm-tiny", log=logs.append)
    assert path == model_store / "cfm-tiny" and calls == ["edge-train", "edge-calibrate"]
    assert generated[0]["categories"] == [store.DEMO_SYNTH["category"]] and generated[0]["size"] == store.DEMO_SYNTH["size"]
    info = store.bundle_info(path)
    assert info["calibrated"] and info["demo"]["label"] == store.DEMO_LABEL
    assert info["demo"]["synth"] == store.DEMO_SYNTH
    assert any("building it once" in line for line in logs)
    assert commands[0][3:5] == ["--method", "cfm"]  # the method that lists the demo
    assert store.resolve_model("cfm-tiny") == path and calls == ["edge-train", "edge-calibrate"]  # cached
    assert not [p for p in model_store.iterdir() if p.name.startswith(".build-")]


def test_the_demo_list_and_training_arguments_come_from_the_methods(model_store, monkeypatch):
    demo = Demo(name="zz-demo", train_args=["--variant", "v1", "--epochs", "1"], categories=("box",),
                synth_args=["--size", "96"], calibrate_args=["--extra"])
    monkeypatch.setattr(store, "demo_models", lambda: {"zz-demo": ("zzmethod", demo)})
    calls, generated, commands = [], [], []
    tool = _fake_tool(calls)
    monkeypatch.setattr(store, "_run_tool", lambda cmd, what, log: commands.append(cmd) or tool(cmd, what, log))
    monkeypatch.setattr("edge_runtime.data.synth.generate_dataset",
                        lambda out, **kw: generated.append(kw) or Path(out).mkdir(parents=True))
    path = store.resolve_model("zz-demo", log=lambda s: None)
    assert commands[0][3:9] == ["--method", "zzmethod", "--variant", "v1", "--epochs", "1"]
    assert "--category" in commands[0] and commands[0][commands[0].index("--category") + 1] == "box"
    assert commands[1][-1] == "--extra"
    assert generated[0]["size"] == 96 and generated[0]["categories"] == ["box"]
    assert store.bundle_info(path)["demo"]["synth"]["category"] == "box"
    with pytest.raises(BundleError, match="not a demo name \\(zz-demo\\)"):
        store.resolve_model("cfm-tiny-nope")


def test_failed_demo_build_leaves_nothing_half_built(model_store, monkeypatch):
    def failing(cmd, what, log):
        Path(dict(zip(cmd[3::2], cmd[4::2]))["--out"]).mkdir(parents=True)
        raise BundleError(f"building the demo bundle failed: {what} exited with status 2 (its output is above)")

    monkeypatch.setattr(store, "_run_tool", failing)
    monkeypatch.setattr("edge_runtime.data.synth.generate_dataset", lambda out, **kw: Path(out).mkdir(parents=True))
    with pytest.raises(BundleError, match="edge-train exited with status 2"):
        store.resolve_model("cfm-small", log=lambda s: None)
    assert sorted(p.name for p in model_store.iterdir()) == [".demo-data", ".lock"]


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--frames", "0"], "--frames must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--fps", "-3"], "--fps must be > 0"),
    (["--station", "line.1"], "station id"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--frame-deadline", "0"], "--frame-deadline must be > 0"),
    (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
    (["--curve-clients", "/tmp"], "--curve-clients needs --curve-keys"),
])
def test_bad_arguments_exit_2_with_the_reason(model_store, capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_gen_keys_writes_a_curve_key_pair(tmp_path, capsys):
    assert cli.main(["--gen-keys", str(tmp_path / "keys")]) == 0
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["edge.key", "edge.key_secret"]
    assert "edge.key_secret" in capsys.readouterr().out
    assert cli.main(["--gen-keys", str(tmp_path / "keys")]) == 2  # never overwrites keys


def _cli(tmp_path: Path, *extra: str, bundle: Path | None = None) -> list[str]:
    cat = [] if any(e in ("--source", "--category") for e in extra) else ["--category", "puck"]
    return [sys.executable, "-m", "edge_runtime.cli.run", "--model", str(bundle or noop_bundle(tmp_path / "bundle")),
            "--backend", "noop", "--alerts", ANY_PORT, "--replay-endpoint", ANY_PORT,
            "--journal", str(tmp_path / "j.sqlite"), "--synth-pool", "4", *cat, *extra]


def test_cli_run_prints_summary_and_writes_stats_json(tmp_path):
    stats = tmp_path / "stats.json"
    proc = subprocess.run(["sh", "-c", 'umask 027 && exec "$@"', "sh",
                           *_cli(tmp_path, "--frames", "12", "--stats-json", str(stats), "--json", "-")],
                          capture_output=True, text=True, timeout=scaled(180))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary == json.loads(stats.read_text())
    assert summary["frames"]["captured"] == 12 and summary["invariant"]["holds"] is True
    assert {"throughput_fps", "latency_ms", "run_id", "bundle_hash", "config", "worker_restarts"} <= summary.keys()
    assert summary["config"]["frames"] == 12 and summary["config"]["backend"] == "noop"
    assert "edge-run summary" in proc.stderr and "loss accounting: captured 12 =" in proc.stderr
    assert stats.stat().st_mode & 0o777 == 0o640  # the user's umask, not mkstemp's 0600
    assert "per category:" in proc.stderr and "  puck: " in proc.stderr


def test_every_flag_has_help_and_json_takes_one_metavar():
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    (json_flag,) = [a for a in parser._actions if "--json" in a.option_strings]
    assert json_flag.metavar == "FILE|-" and json_flag.default is None
    assert parser.parse_args(["--backend", "auto"]).backend == "auto"


def _replay_dir(make_mvtec, tmp_path):
    root = make_mvtec(tmp_path / "data", categories=("widget", "gadget"))
    bad = root / "widget/test/good/rgb/000.png"
    bad.write_bytes(bad.read_bytes()[:60])  # unreadable: one ERROR frame
    return root


def test_directory_replay_defaults_to_the_bundles_category_and_exits_3_on_error_frames(tmp_path, make_mvtec):
    root = _replay_dir(make_mvtec, tmp_path)
    bundle = noop_bundle(tmp_path / "bundle", training={"category": "widget"})
    proc = subprocess.run(_cli(tmp_path, "--source", str(root), "--json", str(tmp_path / "s.json"), bundle=bundle),
                          capture_output=True, text=True, timeout=scaled(180))
    assert proc.returncode == 3, proc.stderr  # the run completed, one frame ended as ERROR
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["frames"]["captured"] == 6 and list(summary["categories"]) == ["widget"]
    assert summary["frames"]["ERROR"] == 1
    assert "reasons (frames, reason):" in proc.stdout and "unreadable sample" in proc.stdout
    (reason_line,) = [line for line in proc.stdout.splitlines() if "unreadable sample" in line]
    assert len(reason_line) <= 175  # one line per reason, truncated
    proc = subprocess.run(_cli(tmp_path, "--source", str(root), "--all-categories", "--json", str(tmp_path / "a.json"),
                               bundle=bundle), capture_output=True, text=True, timeout=scaled(180))
    summary = json.loads((tmp_path / "a.json").read_text())
    assert proc.returncode == 3 and summary["frames"]["captured"] == 12
    assert sorted(summary["categories"]) == ["gadget", "widget"] and "  gadget: " in proc.stdout
    other = noop_bundle(tmp_path / "other", training={"category": "nothere"})
    proc = subprocess.run(_cli(tmp_path, "--source", str(root), bundle=other), capture_output=True, text=True,
                          timeout=scaled(180))
    assert proc.returncode == 2 and "'nothere'" in proc.stderr and "--all-categories" in proc.stderr


def test_a_refused_bind_exits_2_before_anything_starts(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(_cli(tmp_path, "--alerts", "tcp://0.0.0.0:5556", "--frames", "3"),
                          capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 2 and "refusing to bind tcp://0.0.0.0:5556" in proc.stderr
    assert "started" not in proc.stderr and not (tmp_path / "j.sqlite").exists()
    assert time.monotonic() - t0 < scaled(60)


def test_reading_a_manifest_in_the_supervisor_imports_no_torch(tmp_path):
    bundle = noop_bundle(tmp_path / "b")
    code = ("import sys; import edge_runtime.pipeline.supervisor, edge_runtime.cli.run; "
            "from edge_runtime.pipeline.store import bundle_info; "
            f"bundle_info({str(bundle)!r}); "
            "from edge_runtime.pipeline.loops import load_preprocessing; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_stops_a_live_run_promptly_and_cleanly(tmp_path, signum, code):
    proc = subprocess.Popen(_cli(tmp_path, "--fps", "20"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = threading.Event()
    err_lines: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            err_lines.append(line)
            if "started:" in line:
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(scaled(120)), "".join(err_lines)
        deadline = time.monotonic() + scaled(30)
        while time.monotonic() < deadline and not any("frames" in line for line in err_lines):
            time.sleep(0.1)  # the live view's first line: frames are flowing
        stages = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_child_of(p, proc.pid)]
        assert len(stages) == 4  # capture, preprocess, worker, alert
        t0 = time.monotonic()
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=scaled(60))
        assert time.monotonic() - t0 < scaled(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, "".join(err_lines)  # Ctrl-C: 130, after the summary
    assert "stopped by signal" in out and "[holds]" in out
    captured = int(out.split("loss accounting: captured ")[1].split()[0])
    assert captured >= 1
    deadline = time.monotonic() + scaled(10)
    while time.monotonic() < deadline and [pid for pid in stages if Path(f"/proc/{pid}").exists()]:
        time.sleep(0.1)
    assert not [pid for pid in stages if Path(f"/proc/{pid}").exists()]  # no stage left behind


def _is_child_of(proc_dir: Path, pid: int) -> bool:
    """True if the /proc entry is a stage process (multiprocessing spawn) whose parent is ``pid``."""
    try:
        stat = (proc_dir / "stat").read_text()
        cmdline = (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline


def test_curve_clients_flag_lets_only_listed_gateways_subscribe(tmp_path):
    import re

    import zmq

    from edge_runtime.pipeline import security

    security.generate_keys(tmp_path / "station")
    security.generate_keys(tmp_path / "allowed", name="gateway")
    security.generate_keys(tmp_path / "stranger", name="stranger")
    station_public = tmp_path / "station" / "edge.key"
    cmd = _cli(tmp_path, "--frames", "6", "--fps", "20", "--wait-subscribers", "1", "--startup-timeout",
               str(scaled(120)), "--curve-keys", str(tmp_path / "station"), "--curve-clients", str(tmp_path / "allowed"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    endpoint: list[str] = []
    found = threading.Event()
    err_lines: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            err_lines.append(line)
            m = re.search(r"waiting for 1 alert subscriber\(s\) on (tcp://\S+)", line)
            if m:
                endpoint.append(m.group(1))
                found.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    ctx = zmq.Context()
    subs = {}
    try:
        assert found.wait(scaled(120)), "".join(err_lines)
        for name in ("stranger", "allowed"):  # the stranger first: it must not count as the subscriber
            sub = ctx.socket(zmq.SUB)
            sub.linger = 0
            security.apply_curve_client(sub, tmp_path / name, station_public)
            sub.subscribe(b"")
            sub.connect(endpoint[0])
            subs[name] = sub
            if name == "stranger":
                time.sleep(1.0)
                assert not any("started:" in line for line in err_lines)  # still waiting for a listed one
        got = {name: [] for name in subs}
        deadline = time.monotonic() + scaled(120)
        while proc.poll() is None and time.monotonic() < deadline:
            for name, sub in subs.items():
                while sub.poll(20):
                    got[name].append(sub.recv_multipart())
        out, _ = proc.communicate(timeout=scaled(60))
    finally:
        if proc.poll() is None:
            proc.kill()
        for sub in subs.values():
            sub.close(linger=0)
        ctx.term()
    assert proc.returncode == 0, "".join(err_lines)
    assert "loss accounting: captured 6" in out
    decisions = [m for m in got["allowed"] if not m[0].endswith(b".HEARTBEAT")]
    assert len(decisions) == 6 and got["stranger"] == []  # subscribed before the start: every record


def test_an_outdated_demo_bundle_is_rebuilt_and_a_users_own_bundle_is_not(model_store, monkeypatch):
    calls = []
    monkeypatch.setattr(store, "_run_tool", _fake_tool(calls))
    monkeypatch.setattr("edge_runtime.data.synth.generate_dataset", lambda out, **kw: Path(out).mkdir(parents=True))
    path = store.resolve_model("cfm-tiny", log=lambda s: None)
    recipe = store.bundle_info(path)["demo"]["recipe"]
    assert recipe == store.demo_recipe(*store.demo_models()["cfm-tiny"]) and len(calls) == 2
    monkeypatch.setattr(store, "DEMO_RECIPE_VERSION", store.DEMO_RECIPE_VERSION + 1)  # a default changed
    logs = []
    assert store.resolve_model("cfm-tiny", log=logs.append) == path and len(calls) == 4
    assert any("outdated demo" in line for line in logs)
    assert store.bundle_info(path)["demo"]["recipe"] != recipe
    assert sorted(p.name for p in model_store.iterdir() if p.name.startswith(".old-")) == []
    assert store.resolve_model("cfm-tiny") == path and len(calls) == 4  # current again: reused
    # a bundle of the user's own under a demo's name (no demo entry) is served as it is
    own = model_store / "cfm-small"
    shutil.copytree(path, own)
    from edge_runtime.bundle import update_manifest

    update_manifest(own, demo=None)
    assert store.resolve_model("cfm-small") == own and len(calls) == 4


def test_bench_table_reports_overhead_against_nominal_and_own_model_time():
    from edge_runtime.cli.run import bench_table

    lat = {"e2e": {"p50": 1.0, "p99": 2.0}, "stage": {k: {"p50": 0.0} for k in ("capture", "preprocess", "infer", "alert")},
           "queue_wait": {"infer": {"p50": 0.0}}, "infer_steps": {"noop": {"mean": 61.0, "p50": 61.0}}}
    summary = {"latency_ms": lat, "throughput_fps": 1000.0 / 64.0, "detector": "noop", "config": {"synth_size": 64}}
    row = {"name": "no-op, 60 ms model", "workers": 1, "backend_options": {"delay_ms": 60.0}}
    line = bench_table([(row, summary)]).splitlines()[2]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[4:8] == ["64.00", "4.00 (6.7 %)", "61.00", "3.00 (4.9 %)"]
