"""The HTTP API against its own OpenAPI document, judged by tools nobody here wrote.

Starts notion-sim (auto-approving) and a tokenkeeper on SQLite, both the built binary on
127.0.0.1, connects two simulated workspaces through the real connect flow, then:

1. fetches /openapi.json (no API key) and validates it with openapi-spec-validator, as OpenAPI
   3.1;
2. runs schemathesis against the running tokenkeeper with an admin key, every check on, a
   bounded number of examples per operation and a time bound: no answer may be a 5xx, and
   every answer must match the document (status, content type, headers, body).

Operations on one connection get a real one (schemathesis.toml), so that their 200 answers are
checked too; DELETE gets a connection of its own, so that the others stay active.

Usage: python tests/python/check_api.py <path to the tokenkeeper binary>
Exits non-zero on any failure; everything it starts is stopped before it exits.
"""

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import requests
from openapi_spec_validator import validate

HERE = Path(__file__).resolve().parent
# Per-operation examples and the whole run's bound: about two minutes on two cores.
MAX_EXAMPLES = int(os.environ.get("TOKENKEEPER_SCHEMATHESIS_EXAMPLES", "50"))
RUN_TIMEOUT_S = 300


def start(cmd, env, ready):
    """Starts `cmd` and waits (at most 60 s) for a stdout line matching `ready`; returns the
    process and the match."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"{cmd[0]} {cmd[1]} exited before it was ready")
        found = re.search(ready, line)
        if found:
            return proc, found
    proc.kill()
    raise SystemExit(f"{cmd[0]} {cmd[1]} was not ready within 60 s")


def connect(base, key, end_user):
    """The real connect flow, as a browser follows it (the simulator approves at once)."""
    api = {"Authorization": f"Bearer {key}"}
    r = requests.post(
        f"{base}/v1/connect-sessions",
        json={"provider": "notion", "end_user_id": end_user, "return_to": f"{base}/done"},
        headers=api,
        timeout=10,
    )
    assert r.status_code == 201, r.text
    browser = requests.Session()
    url = r.json()["url"]
    for _ in range(5):
        hop = browser.get(url, allow_redirects=False, timeout=10)
        assert hop.is_redirect, f"{url}: {hop.status_code}"
        url = hop.headers["location"]
        if url.startswith(f"{base}/done"):
            query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
            assert query["status"] == ["connected"], url
            return query["connection_id"][0]
    raise AssertionError("the connect flow did not come back to return_to")


def main():
    binary = sys.argv[1]
    key = "admin:" + secrets.token_urlsafe(24)
    admin_key = key.split(":", 1)[1]
    procs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, TOKENKEEPER_LOG="warn")
            sim, found = start(
                [binary, "notion-sim", "--listen", "127.0.0.1:0", "--auto-approve", "--fresh-identity"],
                env,
                r"(http://127\.0\.0\.1:\d+)",
            )
            procs.append(sim)
            sim_url = found.group(1)
            env.update(
                TOKENKEEPER_LISTEN="127.0.0.1:0",
                TOKENKEEPER_DATABASE_URL=f"sqlite://{tmp}/tokenkeeper.db",
                TOKENKEEPER_API_KEYS=key,
                TOKENKEEPER_NOTION_BASE_URL=sim_url,
                TOKENKEEPER_NOTION_CLIENT_ID="tokenkeeper-dev",
                TOKENKEEPER_NOTION_CLIENT_SECRET="dev-secret-not-for-production",
            )
            tk, found = start([binary, "serve"], env, r"listening on (http://\S+)")
            procs.append(tk)
            base = found.group(1)

            document = requests.get(f"{base}/openapi.json", timeout=10)
            assert document.status_code == 200, document.status_code
            spec = document.json()
            assert spec["openapi"].startswith("3.1."), spec["openapi"]
            validate(spec)
            print(f"openapi-spec-validator: the document of {len(spec['paths'])} paths is valid OpenAPI {spec['openapi']}")

            live = connect(base, admin_key, "schemathesis-live")
            doomed = connect(base, admin_key, "schemathesis-doomed")
            config = (HERE / "schemathesis.toml").read_text()
            config = config.replace("@LIVE@", live).replace("@DOOMED@", doomed)
            config_path = Path(tmp) / "schemathesis.toml"
            config_path.write_text(config)
            cmd = [
                str(Path(sys.executable).parent / "schemathesis"),
                "--config-file",
                str(config_path),
                "run",
                f"{base}/openapi.json",
                "--header",
                f"Authorization: Bearer {admin_key}",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                os.environ.get("TOKENKEEPER_SCHEMATHESIS_SEED", "20260608"),
                "--no-color",
            ]
            started = time.monotonic()
            try:
                result = subprocess.run(cmd, timeout=RUN_TIMEOUT_S, env=env)
            except subprocess.TimeoutExpired:
                raise SystemExit(f"schemathesis did not finish within {RUN_TIMEOUT_S} s")
            print(f"schemathesis: exit {result.returncode} after {time.monotonic() - started:.0f} s")
            if result.returncode != 0:
                raise SystemExit(result.returncode)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
