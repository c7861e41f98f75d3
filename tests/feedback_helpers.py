"""Shared helpers of the feedback tests: small projects of world renders, and a real server."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from t2ialign.feedback import FeedbackStore
from t2ialign.world import parse, perturbations, render, suite


def world_rows(n_prompts: int, per_prompt: int, seed: int = 0, every: int = 1) -> list[dict]:
    """Generations of seen-suite prompts: about half true renders, half renders of a spec that
    differs in one attribute (so the checker says good to some and bad to others)."""
    rng = np.random.default_rng(seed)
    rows = []
    prompts = suite("seen")[::every][:n_prompts]
    for r in prompts:
        spec = parse(r["prompt"])
        others = perturbations(spec)
        for s in range(per_prompt):
            shown = spec if rng.random() < 0.5 else others[int(rng.integers(len(others)))][1]
            rows.append(
                dict(image=render(shown, seed=s), prompt=r["prompt"], model_id="world-render", seed=s)
            )
    return rows


def make_project(
    path: Path, n_prompts: int = 8, per_prompt: int = 4, k: int = 2, every: int = 1
) -> FeedbackStore:
    store = FeedbackStore.create(path, labels_per_image=k)
    store.add_generations(world_rows(n_prompts, per_prompt, every=every))
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiClient:
    """A light JSON client (http.client: far less CPU than httpx, which matters with 8 threads on a
    small machine). ``get``/``post`` return (status, body); connection errors raise OSError."""

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body=None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        try:
            self.conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            r = self.conn.getresponse()
            return r.status, json.loads(r.read() or b"{}")
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            raise OSError(f"{method} {path}: {e}") from e

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def post(self, path: str, body) -> tuple[int, dict]:
        return self.request("POST", path, body)

    def close(self) -> None:
        self.conn.close()


class Server:
    """``t2ialign label serve`` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, project: Path, log: Path):
        self.project, self.log = project, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "T2IALIGN_DEBUG"}
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "t2ialign.cli.main", "label", "serve", "--project", str(project)]
            + ["--port", str(self.port), "--log-level", "warning"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.time() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@contextlib.contextmanager
def running_server(project: Path, log: Path):
    server = Server(project, log)
    try:
        yield server
    finally:
        server.stop()
