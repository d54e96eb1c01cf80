"""The SDK from Python without a coordinator: every local call, its typed errors, and the host
callbacks (clock, logger). The round tests against a real service are in test_rounds.py."""

import json
import threading

import pytest
import starling_sdk as s

ITEMS = 40


def config(**kw) -> s.DeviceConfig:
    base = dict(client_id=1, credential="unused", model_family="bpr-mf", items=ITEMS, dim=8)
    base.update(kw)
    return s.DeviceConfig(**base)


CONSENTED = s.Consent(personalization=True, training=True)


def event(item, kind=None, at_ms=None, context=None) -> s.Event:
    return s.Event(
        item=item,
        at_ms=at_ms if at_ms is not None else s.now_ms(),
        kind=kind if kind is not None else s.EventKind.PURCHASE(),
        context=context or s.context_now(),
    )


def test_version_names_the_protocol():
    assert "protocol" in s.sdk_version()


def test_nothing_is_stored_without_consent():
    d = s.StarlingDevice.open(config())
    assert d.consent() == s.Consent(personalization=False, training=False)
    with pytest.raises(s.StarlingError.NoConsent):
        d.record(event(1))
    assert d.privacy_report().events_stored == 0
    d.set_consent(s.Consent(personalization=True, training=False))
    assert d.record(event(1)) > 0
    with pytest.raises(s.StarlingError.NoConsent):
        d.run_round()


def test_invalid_events_raise_invalid_input_and_store_nothing():
    d = s.StarlingDevice.open(config(default_consent=CONSENTED))
    bad = [
        event(ITEMS),  # unknown item
        event(1, kind=s.EventKind.RATING(stars=6)),
        event(1, at_ms=s.now_ms() + 3_600_000),  # an hour in the future
        event(1, at_ms=1_000),  # older than the 90-day retention
        event(1, context=s.EventContext(time_of_day=9, weekday=0, device=s.DeviceClass.PHONE)),
        event(1, context=s.EventContext(time_of_day=0, weekday=0, device=s.DeviceClass.PHONE, region=16)),
    ]
    for e in bad:
        with pytest.raises(s.StarlingError.InvalidInput) as err:
            d.record(e)
        assert err.value.detail
    # A batch with one bad event stores none of them.
    with pytest.raises(s.StarlingError.InvalidInput):
        d.record_batch([event(2), event(ITEMS + 5)])
    assert d.privacy_report().events_stored == 0
    with pytest.raises(s.StarlingError.InvalidInput):
        d.similar_items(ITEMS, 3)


def test_recommendations_fall_back_gracefully_and_export_and_forget_work():
    d = s.StarlingDevice.open(config(default_consent=CONSENTED))
    recs = d.recommend(5, None)
    assert recs.source == s.RecommendationSource.CATALOGUE
    assert len(recs.items) == 5
    assert all(r.reason.is_CATALOGUE() for r in recs.items)
    ids = d.record_batch([event(i, kind=s.EventKind.VIEW(dwell_ms=45_000)) for i in range(3)])
    assert len(ids) == 3
    d.record(event(7, kind=s.EventKind.SKIP()))
    # No global model yet: still the catalogue order, never an empty or broken list; the skipped
    # item is left out.
    recs = d.recommend(10, s.context_now(s.DeviceClass.PHONE))
    assert len(recs.items) == 10 and 7 not in [r.item for r in recs.items]
    assert d.similar_items(1, 5).items == []

    export = json.loads(d.export_json())
    assert export["schema"].startswith("starling.sdk.export/")
    assert sorted(e["item"] for e in export["events"]) == [0, 1, 2, 7]
    report = d.privacy_report()
    assert report.events_stored == 4 and report.updates_sent == 0 and report.bytes_sent == 0
    assert json.loads(d.privacy_report_json())["events_stored"] == 4

    d.forget()
    assert json.loads(d.export_json())["events"] == []
    assert d.privacy_report().events_stored == 0


def test_the_store_persists_across_reopen_and_refuses_a_wrong_key(tmp_path):
    key = bytes(range(32))
    cfg = config(default_consent=CONSENTED, storage_dir=str(tmp_path), storage_key=key)
    d = s.StarlingDevice.open(cfg)
    d.record(event(3))
    del d
    d = s.StarlingDevice.open(cfg)
    assert d.privacy_report().events_stored == 1
    del d
    with pytest.raises(s.StarlingError.Storage):
        s.StarlingDevice.open(config(storage_dir=str(tmp_path), storage_key=bytes(32)))
    with pytest.raises(s.StarlingError.InvalidConfig):
        s.StarlingDevice.open(config(storage_dir=str(tmp_path), storage_key=b"short"))
    with pytest.raises(s.StarlingError.InvalidConfig):
        s.StarlingDevice.open(config(model_family="transformer"))


def test_forget_with_a_new_key_rotates_the_storage_key(tmp_path):
    old, new = bytes([1] * 32), bytes([2] * 32)
    d = s.StarlingDevice.open(config(default_consent=CONSENTED, storage_dir=str(tmp_path), storage_key=old))
    d.record(event(3))
    with pytest.raises(s.StarlingError.InvalidInput):
        d.forget_with_key(b"too short")
    assert d.privacy_report().events_stored == 1, "a refused rotation forgets nothing"
    d.forget_with_key(new)
    assert d.privacy_report().events_stored == 0
    del d
    with pytest.raises(s.StarlingError.Storage):
        s.StarlingDevice.open(config(storage_dir=str(tmp_path), storage_key=old))
    assert s.StarlingDevice.open(config(storage_dir=str(tmp_path), storage_key=new)).privacy_report().events_stored == 0


def test_conditions_come_from_the_host_and_gate_rounds():
    d = s.StarlingDevice.open(config(default_consent=CONSENTED))

    class Plugged(s.HostConditions):
        def __init__(self):
            self.calls = 0

        def current(self):
            self.calls += 1
            return s.DeviceConditions(charging=True, unmetered=False, idle=True, battery_percent=80)

    host = Plugged()
    d.set_conditions_provider(host)
    assert host.calls >= 1
    assert d.conditions().charging
    # Metered: refused before anything is sent.
    with pytest.raises(s.StarlingError.NotAllowed):
        d.run_round()
    # A device without a coordinator reports a network error once the conditions allow.
    d2 = s.StarlingDevice.open(config(default_consent=CONSENTED, participation=s.ParticipationConfig(
        require_charging=False, require_unmetered=False, require_idle=False, min_battery_percent=0)))
    with pytest.raises(s.StarlingError.Network):
        d2.run_round()


def test_the_host_clock_dates_the_device():
    year_2001_ms = 978_307_200_000

    class Frozen(s.HostClock):
        def now_ms(self):
            return year_2001_ms

    d = s.StarlingDevice.open_with_clock(config(default_consent=CONSENTED), Frozen())
    d.record(event(1, at_ms=year_2001_ms - 1000))
    # "Now" is 2001 for this device: an event dated today is far in its future.
    with pytest.raises(s.StarlingError.InvalidInput) as err:
        d.record(event(1))
    assert "future" in err.value.detail


def test_a_rust_panic_becomes_an_internal_error_and_the_process_goes_on():
    with pytest.raises(s.StarlingError.Internal) as err:
        s.debug_panic("checked from Python")
    assert "checked from Python" in err.value.detail
    assert "protocol" in s.sdk_version()


def test_a_host_callback_that_raises_is_an_internal_error_not_a_crash():
    class Broken(s.HostClock):
        def __init__(self):
            self.fail = False

        def now_ms(self):
            if self.fail:
                raise RuntimeError("the host's clock broke")
            return s.now_ms()

    clock = Broken()
    d = s.StarlingDevice.open_with_clock(config(default_consent=CONSENTED), clock)
    d.record(event(2))
    clock.fail = True
    # UniFFI reports the exception inside Rust as a panic; the boundary turns it into an error.
    with pytest.raises(s.StarlingError.Internal):
        d.record(event(3))
    clock.fail = False
    # The device is still usable and lost nothing.
    d.record(event(4))
    assert d.privacy_report().events_stored == 2


def test_the_logger_receives_the_sdks_records():
    records = []
    lock = threading.Lock()

    class Collect(s.HostLogger):
        def log(self, level, target, message):
            with lock:
                records.append((level, target, message))

    s.set_logger(Collect(), s.LogLevel.INFO)
    try:
        d = s.StarlingDevice.open(config())
        d.set_consent(CONSENTED)
        d.forget()
    finally:
        s.clear_logger()
    messages = [m for (_, _, m) in records]
    assert any("consent recorded" in m and "training=true" in m for m in messages), messages
    assert any("forgot the user" in m for m in messages), messages
    assert all(level in (s.LogLevel.INFO, s.LogLevel.WARN, s.LogLevel.ERROR) for (level, _, _) in records)
    assert all(t.startswith("starling") for (_, t, _) in records)
    # Cleared: nothing more arrives.
    n = len(records)
    s.StarlingDevice.open(config()).set_consent(CONSENTED)
    assert len(records) == n


def test_the_log_never_carries_the_users_events():
    """The host's log may end up in crash reports: at every level, what the SDK logs about local
    calls must not name the user's items or what they did with them."""
    records = []

    class Collect(s.HostLogger):
        def log(self, level, target, message):
            records.append(message)

    s.set_logger(Collect(), s.LogLevel.TRACE)
    try:
        d = s.StarlingDevice.open(config(default_consent=CONSENTED))
        d.record_batch([event(31, kind=s.EventKind.VIEW(dwell_ms=41_234)), event(37, kind=s.EventKind.RATING(stars=5))])
        d.record(event(33, kind=s.EventKind.SKIP()))
        d.recommend(5, s.context_now())
        d.similar_items(31, 3)
        d.export_json()
        d.privacy_report_json()
        with pytest.raises(s.StarlingError.InvalidInput):
            d.record(event(ITEMS + 3))
        d.forget()
    finally:
        s.clear_logger()
    assert records, "the SDK logged nothing at TRACE"
    for m in records:
        for secret in ("41234", "41_234", "dwell", "stars", "item 31", "item=31", "item: 31", "37", "skip"):
            assert secret not in m.lower(), (secret, m)


def test_calls_from_many_threads_are_safe():
    d = s.StarlingDevice.open(config(default_consent=CONSENTED))
    errors = []

    def work(offset):
        try:
            for i in range(20):
                d.record(event((offset + i) % ITEMS, kind=s.EventKind.CLICK()))
                d.recommend(5, None)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t * 7,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert d.privacy_report().events_stored == 80
