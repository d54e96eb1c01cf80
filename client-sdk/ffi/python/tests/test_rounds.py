"""End to end: Python apps take part in real rounds of a `starling serve` over loopback QUIC
(TLS 1.3, enrollment tokens, central DP), then get personal recommendations on the device."""

import json
import pathlib
import subprocess
import sys
import threading
import time

import starling_sdk as s

from conftest import DIM, ITEMS

ROUNDS_EACH = 2
DEADLINE_S = 150
APP = pathlib.Path(__file__).resolve().parents[1] / "examples" / "app.py"

# Two tastes: clients 1-3 like the first items, 4-5 the later ones; client 6 is the example app.
TASTES = {
    1: range(0, 8),
    2: range(2, 10),
    3: range(1, 9),
    4: range(30, 38),
    5: range(32, 40),
}
SKIPPED = 20


class Good(s.HostConditions):
    def current(self):
        return s.DeviceConditions(charging=True, unmetered=True, idle=True, battery_percent=90)


def open_device(service, client_id: int) -> s.StarlingDevice:
    d = s.StarlingDevice.open(
        s.DeviceConfig(
            client_id=client_id,
            credential=service.tokens[client_id],
            model_family="bpr-mf",
            items=ITEMS,
            dim=DIM,
            coordinator=s.CoordinatorConfig(address=service.address, server_name="localhost", ca_pem=service.ca_pem),
            default_consent=s.Consent(personalization=True, training=True),
            response_timeout_ms=30_000,
        )
    )
    d.set_conditions_provider(Good())
    ctx = s.context_now(s.DeviceClass.PHONE)
    now = s.now_ms()
    events = [
        s.Event(item=i, at_ms=now - 60_000 * n, kind=s.EventKind.PURCHASE(), context=ctx)
        for n, i in enumerate(TASTES[client_id])
    ]
    events.append(s.Event(item=SKIPPED, at_ms=now, kind=s.EventKind.SKIP(), context=ctx))
    d.record_batch(events)
    return d


def take_part(device: s.StarlingDevice, result: dict, stop: threading.Event):
    """Joins rounds until `stop` (set once every device has ROUNDS_EACH accepted rounds: a device
    that stops early would leave the others short of the service's minimum of reports)."""
    result["accepted"] = 0
    result["outcomes"] = []
    while not stop.is_set():
        try:
            o = device.run_round()
            result["outcomes"].append(o.outcome)
            if o.accepted:
                result["accepted"] += 1
            else:
                time.sleep(0.1)
        except (s.StarlingError.ComeBackLater, s.StarlingError.Busy) as e:
            result["outcomes"].append(type(e).__name__)
            time.sleep(0.1)
        except Exception as e:  # a real failure: recorded, the test reports it
            result["error"] = repr(e)
            return


def test_python_apps_train_with_the_real_service_and_get_personal_recommendations(service):
    devices = {c: open_device(service, c) for c in range(1, 5)}
    # Client 5 uses the background scheduler with a round listener instead of explicit rounds.
    scheduled = open_device(service, 5)
    heard = []
    heard_lock = threading.Lock()

    class Listener(s.RoundListener):
        def on_round(self, outcome, error):
            with heard_lock:
                heard.append((outcome, error))

    # Client 6 is the example app, a separate Python process.
    app = subprocess.Popen(
        [
            sys.executable, str(APP),
            "--coordinator", service.address, "--ca", str(service.workdir / "tls" / "ca.pem"),
            "--client-id", "6", "--token", service.tokens[6],
            "--items", str(ITEMS), "--dim", str(DIM),
            "--likes", "0,1,2,3,4,5", "--skips", str(SKIPPED),
            "--rounds", str(ROUNDS_EACH), "--timeout", str(DEADLINE_S),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    scheduled.start_scheduler(200, 100, 100, Listener())
    assert scheduled.scheduler_running()
    results = {c: {} for c in devices}
    stop = threading.Event()
    threads = [threading.Thread(target=take_part, args=(d, results[c], stop)) for c, d in devices.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        with heard_lock:
            by_scheduler = sum(1 for (o, _) in heard if o is not None and o.accepted)
        # The app (a separate process) needs the others to keep checking in until it has its
        # rounds too: alone it is below the service's minimum of check-ins.
        app_done = app.poll() is not None
        if app_done and by_scheduler >= ROUNDS_EACH and all(
            r.get("accepted", 0) >= ROUNDS_EACH for r in results.values()
        ):
            break
        if any("error" in r for r in results.values()):
            break
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    scheduled.stop_scheduler()
    assert not scheduled.scheduler_running()
    app_out, app_err = app.communicate(timeout=DEADLINE_S)

    diagnostics = f"results={results}\nheard={heard}\nserver log:\n{service.server_log()[-4000:]}"
    for c, r in results.items():
        assert "error" not in r, f"client {c}: {r.get('error')}\n{diagnostics}"
        assert r["accepted"] >= ROUNDS_EACH, f"client {c}\n{diagnostics}"
    with heard_lock:
        accepted_by_scheduler = sum(1 for (o, _) in heard if o is not None and o.accepted)
    assert accepted_by_scheduler >= ROUNDS_EACH, diagnostics

    # The service committed rounds under central DP and charged its ledger.
    status = service.status()
    assert status["rounds_committed"] >= ROUNDS_EACH, status
    assert status["privacy_mode"] == "central"
    assert status["epsilon_spent"] > 0
    assert status["model_version"] >= ROUNDS_EACH

    everyone = dict(devices)
    everyone[5] = scheduled
    for c, d in everyone.items():
        report = d.privacy_report()
        # An accepted round is a training update or, every few rounds, a federated-evaluation report.
        assert report.updates_sent >= 1, (c, vars(report))
        assert report.updates_sent + report.evaluations_sent >= ROUNDS_EACH, (c, vars(report))
        assert report.bytes_sent > 0
        assert report.model_version is not None, (c, vars(report), results.get(c), heard)
        recs = d.recommend(5, s.context_now(s.DeviceClass.PHONE))
        # Personal now: the device holds a global model and enough of its user's own data.
        assert recs.source == s.RecommendationSource.PERSONAL, (c, recs)
        assert len(recs.items) == 5
        assert SKIPPED not in [r.item for r in recs.items]
        liked = set(TASTES[c])
        for r in recs.items:
            # An explanation only ever names one of the user's own positive items.
            if r.reason.is_BECAUSE_YOU_ENGAGED_WITH():
                assert r.reason.item in liked, (c, r)
        # "More like this" works from the global model now.
        assert len(d.similar_items(next(iter(liked)), 3).items) == 3
        # The raw events never left: they are all still here, and only here.
        export = json.loads(d.export_json())
        assert len(export["events"]) == len(TASTES[c]) + 1

    assert app.returncode == 0, f"app failed:\n{app_err[-3000:]}"
    summary = json.loads(app_out.strip().splitlines()[-1])
    assert summary["accepted_rounds"] >= ROUNDS_EACH, summary
    assert summary["source"] == "personal", summary
    assert summary["updates_sent"] >= 1
    assert SKIPPED not in summary["items"]
    # The app's logger forwarded the SDK's records to Python's logging.
    assert "round session ended" in app_err, app_err[-2000:]


def test_withdrawn_consent_keeps_a_device_out_of_rounds(service):
    d = open_device(service, 1)
    d.set_consent(s.Consent(personalization=True, training=False))
    try:
        d.run_round()
        raise AssertionError("a round ran without training consent")
    except s.StarlingError.NoConsent:
        pass
    assert d.privacy_report().updates_sent == 0


def test_a_revoked_or_wrong_token_is_refused_by_the_service(service):
    d = s.StarlingDevice.open(
        s.DeviceConfig(
            client_id=1,
            credential="stk1.not-a-token",
            model_family="bpr-mf",
            items=ITEMS,
            dim=DIM,
            coordinator=s.CoordinatorConfig(address=service.address, server_name="localhost", ca_pem=service.ca_pem),
            default_consent=s.Consent(personalization=True, training=True),
        )
    )
    d.set_conditions_provider(Good())
    outcome = d.run_round()
    assert not outcome.accepted and not outcome.sent_update
    assert outcome.outcome.startswith("refused: "), outcome.outcome
