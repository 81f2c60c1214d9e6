"""Run `polyprompt serve` as a real subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir, data_dir, *extra: str, timeout: float = 120):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYPROMPT_")}
    env["POLYPROMPT_DATA_DIR"] = str(data_dir)
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--log-level", "warning", "--response-cache-mb", "0", *extra]  # a later flag wins
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start in time")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
