"""Fixtures: a real `starling serve` on loopback QUIC, configured for small fast rounds.

The coordinator binary is `$STARLING_BIN`, or `starling` in `$CARGO_TARGET_DIR/release` (default
`<repo>/target/release`). Build it with `cargo build --release --workspace`.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import time
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[4]
ITEMS = 60
DIM = 8
POPULATION = 6


def starling_bin() -> pathlib.Path:
    if os.environ.get("STARLING_BIN"):
        return pathlib.Path(os.environ["STARLING_BIN"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "release" / "starling"


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_keys(text: str, section: str, values: dict) -> str:
    """Sets `key = value` lines of one `[section]` of a TOML file (keys must exist)."""
    out, current, seen = [], None, set()
    for line in text.splitlines():
        m = re.match(r"^\[(.+)\]\s*$", line)
        if m:
            current = m.group(1)
        else:
            k = re.match(r"^(\w+)\s*=", line)
            if current == section and k and k.group(1) in values:
                key = k.group(1)
                line = f"{key} = {json.dumps(values[key])}"
                seen.add(key)
        out.append(line)
    missing = set(values) - seen
    if missing:
        # Keys the template leaves out (commented defaults) are appended to the section's end.
        idx = next(i for i, l in enumerate(out) if l.strip() == f"[{section}]")
        for key in sorted(missing):
            out.insert(idx + 1, f"{key} = {json.dumps(values[key])}")
    return "\n".join(out) + "\n"


class Service:
    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        self.config = workdir / "starling.toml"
        self.ca_pem = (workdir / "tls" / "ca.pem").read_text()
        self.admin_token = (workdir / "secrets" / "admin.token").read_text().strip()
        self.quic_port = 0
        self.admin_port = 0
        self.tokens = {}
        self.proc = None
        self.log = workdir / "serve.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.quic_port}"

    def status(self) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/status",
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def server_log(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """A running coordinator with POPULATION enrolled clients (ids 1..POPULATION), central DP."""
    exe = starling_bin()
    if not exe.exists():
        pytest.fail(f"{exe} is missing: run `cargo build --release --workspace` first")
    work = tmp_path_factory.mktemp("coordinator")
    subprocess.run([exe, "init", "--dir", work], check=True, capture_output=True)
    svc = Service(work)
    svc.quic_port = free_port(socket.SOCK_DGRAM)
    svc.admin_port = free_port(socket.SOCK_STREAM)
    text = svc.config.read_text()
    text = set_keys(text, "server", {"listen": svc.address, "admin_listen": f"127.0.0.1:{svc.admin_port}"})
    text = set_keys(text, "model", {"family": "bpr-mf", "rows": ITEMS, "row_len": DIM})
    text = set_keys(
        text,
        "round",
        {
            "target_participants": 4,
            "min_reports": 3,
            "selection_pool": POPULATION,
            "selection_timeout_ms": 1500,
            "report_timeout_ms": 20000,
            "interval_ms": 100,
            "require_charging": True,
            "require_unmetered": True,
            "require_idle": False,
            "retry_after_ms": 0,
            "retry_window_ms": 200,
            "learning_rate": 0.2,
        },
    )
    text = set_keys(text, "privacy", {"mode": "central", "noise_multiplier": 1.0, "epsilon_budget": 500.0})
    svc.config.write_text(text)
    for client in range(1, POPULATION + 1):
        out = subprocess.run(
            [exe, "token", "issue", "--config", svc.config, "--client", str(client)],
            check=True,
            capture_output=True,
            text=True,
        )
        svc.tokens[client] = out.stdout.strip().splitlines()[0]
    log = open(svc.log, "w")
    svc.proc = subprocess.Popen([exe, "serve", "--config", svc.config], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    deadline = time.monotonic() + 30
    while True:
        try:
            svc.status()
            break
        except Exception:
            if svc.proc.poll() is not None or time.monotonic() > deadline:
                svc.proc.kill()
                pytest.fail(f"starling serve did not come up:\n{svc.server_log()}")
            time.sleep(0.1)
    yield svc
    svc.proc.terminate()
    try:
        svc.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        svc.proc.kill()
    log.close()
