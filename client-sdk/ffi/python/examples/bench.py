#!/usr/bin/env python3
"""Per-call time of the SDK from Python, for the same calls as the Rust bench
(`cargo bench --workspace --bench ffi_calls`): record, recommend(10), privacy_report, on an
in-memory device with 1,000 items of dimension 32.

    python bench.py [--seconds 3] [--storage DIR]
"""

import argparse
import json
import time

import starling_sdk as s


def per_call(fn, seconds: float) -> float:
    """Median over 5 batches of the mean time per call, in microseconds."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:  # warm up and size the batches
        fn()
        n += 1
    batch = max(10, int(n * seconds / 5 / 0.2))
    means = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        means.append((time.perf_counter() - t) / batch * 1e6)
    return sorted(means)[2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--storage", help="a directory for the database (default: in memory)")
    args = p.parse_args()
    d = s.StarlingDevice.open(
        s.DeviceConfig(
            client_id=1, credential="", model_family="bpr-mf", items=1000, dim=32,
            default_consent=s.Consent(personalization=True, training=True),
            storage_dir=args.storage,
        )
    )
    ctx = s.context_now(s.DeviceClass.PHONE)
    state = {"item": 0}

    def record():
        state["item"] = (state["item"] + 7) % 1000
        d.record(s.Event(item=state["item"], at_ms=s.now_ms(), kind=s.EventKind.CLICK(), context=ctx))

    results = {
        "record_us": per_call(record, args.seconds),
        "recommend_10_us": per_call(lambda: d.recommend(10, ctx), args.seconds),
        "privacy_report_us": per_call(d.privacy_report, args.seconds),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
