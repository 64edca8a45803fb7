"""A real Prometheus (Debian's `prometheus` package) on 127.0.0.1 for tests: static scrape
targets, a rule file, its own storage under a temp dir, and its HTTP API.

    with Prometheus(workdir, {"agents": ["198.18.0.1:9470"]}, rule_files=[path]) as prom:
        prom.query('rtrace_node_retransmits_total')    # /api/v1/query -> result list
        prom.alerts()                                  # /api/v1/alerts -> alerts list

A job's targets may also be a mapping of target -> labels: the labels a service discovery
would give it (the Prometheus Operator gives a PodMonitor's targets the pod's namespace, pod
and container), so a test sees what a metric label that collides with them would become.

Scrape and evaluation intervals are 1s (a test's own config, not a recommendation):
conditions turn true quickly, and tests wait for them, never for a fixed time.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from tests.harness.controlplane import end_process, start_process, wait_until

INTERVAL = "1s"

# A job's targets: addresses, or address -> the target's labels.
Targets = Union[Sequence[str], Mapping[str, Mapping[str, str]]]


def static_configs(targets: Targets) -> list[dict]:
    if isinstance(targets, Mapping):
        return [{"targets": [address], "labels": dict(labels)} for address, labels in targets.items()]
    return [{"targets": list(targets)}]


def binary(name: str = "prometheus") -> str:
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: `make setup` installs Debian's prometheus package")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True)


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    def __init__(self, workdir: Path, jobs: dict[str, Targets], rule_files: Sequence[Path] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": INTERVAL, "scrape_timeout": INTERVAL, "evaluation_interval": INTERVAL},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": static_configs(targets)}
                               for job, targets in jobs.items()],
        }, sort_keys=False))
        self.log = self.workdir / "prometheus.log"
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Prometheus":
        checked = promtool("check", "config", str(self.config))
        if checked.returncode != 0:
            raise PrometheusError(f"promtool check config: {checked.stdout}{checked.stderr}")
        # A free port can be taken between probing and binding (other test runs share the
        # machine): try a few.
        for _ in range(5):
            self.port = free_port()
            self.proc = start_process(
                [binary(), f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info"], self.log)
            try:
                wait_until(lambda: self.proc.poll() is not None or self._ready(), "prometheus to be ready", timeout=60)
            except TimeoutError:
                self.stop()
                raise
            if self.proc.poll() is None:
                return self
        raise PrometheusError(f"prometheus did not start: see {self.log}:\n{self.log.read_text()[-2000:]}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, grace=30)
        self.proc = None

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ API

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a success, else PrometheusError with its message."""
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result (vector or scalar as a one-element list)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def rules(self) -> list[dict]:
        return self.api("rules")["groups"]

    def targets_up(self) -> dict[str, str]:
        """scrapeUrl -> health of every active target."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}
