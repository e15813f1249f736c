"""Start the real ComfyUI server of `.host/`, run API-format workflows on it over HTTP, stop it.

Importable (the host tests and the demo use it) and a command line:

    .host/venv/bin/python scripts/comfy_host.py run workflows/api/turbo4d_synthetic_compare.json
    .host/venv/bin/python scripts/comfy_host.py serve --port 8188      # until Ctrl-C

The server runs as its own process group (stopping it stops everything it started) and logs to a
file. With `base_dir`, ComfyUI's models/, input/, output/, user/ and custom_nodes/ live in that
folder (`--base-directory`), with this pack linked into its custom_nodes/: a clean, throwaway host.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = os.environ.get("TURBO4D_HOST", os.path.join(PACK, ".host"))


class HostError(RuntimeError):
    pass


class PromptRejected(HostError):
    """POST /prompt answered 400: the graph did not validate. `.body` is ComfyUI's JSON answer."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(json.dumps(body)[:4000])


class PromptFailed(HostError):
    """The prompt ran and failed. `.entry` is its /history entry, `.message` the exception text."""

    def __init__(self, entry: dict):
        self.entry = entry
        err = execution_error(entry) or {}
        self.message = err.get("exception_message", "")
        self.node_type = err.get("node_type")
        super().__init__(f"{self.node_type}: {self.message}")


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyHost:
    def __init__(self, host_dir: str = HOST, port: int | None = None, base_dir: str | None = None,
                 log_path: str | None = None, output_dir: str | None = None, input_dir: str | None = None,
                 extra_args: tuple = ()):
        self.host_dir = os.path.abspath(host_dir)
        self.comfy_dir = os.path.join(self.host_dir, "ComfyUI")
        self.python = os.path.join(self.host_dir, "venv", "bin", "python")
        self.port = port or free_port()
        self.base_dir = os.path.abspath(base_dir) if base_dir else None
        self.output_dir = output_dir
        self.input_dir = input_dir
        self.extra_args = tuple(extra_args)
        self.log_path = log_path or os.path.join(self.base_dir or self.host_dir, f"comfyui-{self.port}.log")
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.started_s: float | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "ComfyHost":
        if not os.path.isfile(os.path.join(self.comfy_dir, "main.py")):
            raise HostError(f"no ComfyUI at {self.comfy_dir}; run `bash scripts/setup_host.sh` first")
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch"]
        if self.base_dir:
            for sub in ("custom_nodes", "input", "output", "models", "user/default"):
                os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
            link = os.path.join(self.base_dir, "custom_nodes", "turbo4d")
            if not os.path.islink(link):
                os.symlink(PACK, link)
            settings = os.path.join(self.base_dir, "user", "default", "comfy.settings.json")
            if not os.path.exists(settings):
                with open(settings, "w") as f:
                    json.dump({"Comfy.TutorialCompleted": True}, f)
            cmd += ["--base-directory", self.base_dir]
        if self.output_dir:
            cmd += ["--output-directory", os.path.abspath(self.output_dir)]
        if self.input_dir:
            cmd += ["--input-directory", os.path.abspath(self.input_dir)]
        cmd += list(self.extra_args)
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self._log = open(self.log_path, "ab")
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited with code {self.proc.returncode} while starting; log {self.log_path}:\n"
                                f"{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                self.started_s = time.perf_counter() - t0
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        self.stop()
        raise HostError(f"ComfyUI did not answer /system_stats within {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # --- HTTP ---------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data else None

    def post(self, path: str, body: dict, timeout: float = 30.0):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data else None

    def object_info(self) -> dict:
        return self.get("/object_info")

    @property
    def input_directory(self) -> str:
        if self.input_dir:
            return os.path.abspath(self.input_dir)
        return os.path.join(self.base_dir or self.comfy_dir, "input")

    @property
    def output_directory(self) -> str:
        if self.output_dir:
            return os.path.abspath(self.output_dir)
        return os.path.join(self.base_dir or self.comfy_dir, "output")

    @property
    def models_directory(self) -> str:
        return os.path.join(self.base_dir or self.comfy_dir, "models")

    # --- prompts ------------------------------------------------------------------------------
    def submit(self, prompt: dict, extra_data: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": str(uuid.uuid4())}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            return self.post("/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                raise PromptRejected(json.loads(text)) from None
            except json.JSONDecodeError:
                raise HostError(f"POST /prompt -> HTTP {e.code}: {text[:2000]}") from None

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            entry = (hist or {}).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited (code {self.proc.returncode}) while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise HostError(f"prompt {prompt_id} did not finish within {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0, check: bool = True) -> dict:
        """Submits, waits, and returns the /history entry; raises PromptFailed on an error if check."""
        entry = self.wait(self.submit(prompt), timeout)
        if check and entry["status"]["status_str"] != "success":
            raise PromptFailed(entry)
        return entry

    def output_files(self, entry: dict) -> list[str]:
        """Absolute paths of every file a finished prompt's nodes report in their ui outputs."""
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for items in node_out.values():
                for it in items if isinstance(items, list) else []:
                    if isinstance(it, dict) and "filename" in it and it.get("type", "output") == "output":
                        paths.append(os.path.join(self.output_directory, it.get("subfolder", ""), it["filename"]))
        return paths


def load_workflow(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start the server, run API workflows, stop it")
    r.add_argument("workflows", nargs="+")
    r.add_argument("--timeout", type=float, default=600)
    s = sub.add_parser("serve", help="start the server and keep it running until Ctrl-C")
    for p in (r, s):
        p.add_argument("--port", type=int, default=None)
        p.add_argument("--host-dir", default=HOST)
        p.add_argument("--base-dir", default=None, help="a throwaway ComfyUI base directory (--base-directory)")
        p.add_argument("--output-dir", default=None)
        p.add_argument("--log", default=None)
    a = ap.parse_args(argv)

    def on_term(*_):  # `kill` or `timeout` must stop the server too (it runs in its own process group)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    host = ComfyHost(a.host_dir, port=a.port, base_dir=a.base_dir, log_path=a.log, output_dir=a.output_dir)
    host.start()
    print(f"ComfyUI ready at {host.url} in {host.started_s:.1f}s (log {host.log_path})", flush=True)
    try:
        if a.cmd == "serve":
            while host.proc.poll() is None:
                time.sleep(1)
            return host.proc.returncode or 0
        status = 0
        for wf in a.workflows:
            t0 = time.perf_counter()
            try:
                entry = host.run(load_workflow(wf), timeout=a.timeout)
            except (PromptFailed, PromptRejected) as e:
                print(f"FAILED {wf}: {e}", file=sys.stderr)
                status = 1
                continue
            dt = time.perf_counter() - t0
            print(f"{os.path.basename(wf)}: success in {dt:.1f}s")
            for out in entry.get("outputs", {}).values():
                for line in out.get("text", []):
                    print(f"  {line}")
            for p in host.output_files(entry):
                print(f"  {p}")
        return status
    except KeyboardInterrupt:
        return 130
    finally:
        host.stop()


if __name__ == "__main__":
    sys.exit(main())
