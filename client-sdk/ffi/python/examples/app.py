#!/usr/bin/env python3
"""A small Python "app" embedding the Starling SDK.

It records what its user liked and skipped, takes part in federated rounds when a coordinator is
given, and shows personal recommendations with their reasons. The last line it prints is a JSON
summary (the tests read it).

    python app.py                      # offline: records, recommends (non-personal fallback), exports
    python app.py --coordinator 127.0.0.1:4433 --ca tls/ca.pem --client-id 7 \
        --token "$(starling token issue --config starling.toml --client 7)" --rounds 2
"""

import argparse
import json
import logging
import pathlib
import sys
import time

import starling_sdk as s

log = logging.getLogger("starling")


class PythonLogger(s.HostLogger):
    """Forwards the SDK's records to Python's `logging`."""

    LEVELS = {
        s.LogLevel.ERROR: logging.ERROR,
        s.LogLevel.WARN: logging.WARNING,
        s.LogLevel.INFO: logging.INFO,
        s.LogLevel.DEBUG: logging.DEBUG,
        s.LogLevel.TRACE: logging.DEBUG,
    }

    def log(self, level, target, message):
        logging.getLogger(target).log(self.LEVELS[level], message)


class Desktop(s.HostConditions):
    """A desktop app's conditions: on mains power and a wired or Wi-Fi network."""

    def current(self):
        return s.DeviceConditions(charging=True, unmetered=True, idle=True, battery_percent=100)


def explain(reason) -> str:
    if reason.is_BECAUSE_YOU_ENGAGED_WITH():
        return f"because you liked item {reason.item}"
    if reason.is_IN_THIS_CONTEXT():
        return "popular at this time of day"
    if reason.is_NEW_FOR_YOU():
        return "something new for you"
    if reason.is_POPULAR_NOW():
        return "popular now"
    return "from the catalogue"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", help="directory of the on-device database (default: in memory)")
    p.add_argument("--coordinator", help="host:port of `starling serve`")
    p.add_argument("--ca", help="the coordinator's CA certificate (PEM)")
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--token", default="", help="enrollment token")
    p.add_argument("--client-id", type=int, default=1)
    p.add_argument("--items", type=int, default=60)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--likes", default="0,1,2,3,4,5", help="items the user likes (comma-separated)")
    p.add_argument("--skips", default="9", help="items the user skips")
    p.add_argument("--rounds", type=int, default=1, help="accepted rounds to take part in")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for those rounds")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    s.set_logger(PythonLogger(), s.LogLevel.INFO)

    coordinator = None
    if args.coordinator:
        coordinator = s.CoordinatorConfig(
            address=args.coordinator, server_name=args.server_name, ca_pem=pathlib.Path(args.ca).read_text()
        )
    device = s.StarlingDevice.open(
        s.DeviceConfig(
            client_id=args.client_id,
            credential=args.token,
            model_family="bpr-mf",
            items=args.items,
            dim=args.dim,
            storage_dir=args.storage,
            coordinator=coordinator,
            response_timeout_ms=30_000,
        )
    )
    device.set_consent(s.Consent(personalization=True, training=True))
    device.set_conditions_provider(Desktop())

    likes = [int(x) for x in args.likes.split(",") if x]
    skips = [int(x) for x in args.skips.split(",") if x]
    ctx = s.context_now(s.DeviceClass.DESKTOP)
    now = s.now_ms()
    events = [s.Event(item=i, at_ms=now - 1000 * n, kind=s.EventKind.PURCHASE(), context=ctx) for n, i in enumerate(likes)]
    events += [s.Event(item=i, at_ms=now, kind=s.EventKind.SKIP(), context=ctx) for i in skips]
    device.record_batch(events)

    accepted = 0
    outcomes = []
    if coordinator:
        deadline = time.monotonic() + args.timeout
        while accepted < args.rounds and time.monotonic() < deadline:
            try:
                outcome = device.run_round()
                outcomes.append(outcome.outcome)
                accepted += outcome.accepted
                if not outcome.accepted:
                    time.sleep(0.2)
            except (s.StarlingError.ComeBackLater, s.StarlingError.Network, s.StarlingError.Busy) as e:
                log.info("not this time: %s", e)
                time.sleep(0.2)

    recs = device.recommend(5, ctx)
    print(f"recommendations ({recs.source.name.lower()}):")
    for r in recs.items:
        print(f"  item {r.item:4d}  {explain(r.reason)}")
    similar = device.similar_items(likes[0], 3) if likes else None
    if similar is not None and similar.items:
        print(f"more like item {likes[0]}: {[x.item for x in similar.items]}")
    report = device.privacy_report()
    print(
        f"privacy: {report.events_stored} events on this device, {report.updates_sent} updates sent "
        f"({report.bytes_sent} bytes), model version {report.model_version}"
    )
    export = json.loads(device.export_json())
    s.clear_logger()
    print(
        json.dumps(
            {
                "source": recs.source.name.lower(),
                "items": [r.item for r in recs.items],
                "reasons": [explain(r.reason) for r in recs.items],
                "accepted_rounds": accepted,
                "outcomes": outcomes,
                "updates_sent": report.updates_sent,
                "model_version": report.model_version,
                "exported_events": len(export["events"]),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
