"""`make lab` serves the chapters: the recipe's own JupyterLab command runs headless on a loopback
port with a token; the test opens every chapter through the contents API, starts the project's
kernel through the kernels API, imports minipeft in it over the kernel's websocket (as the browser
does), and shuts the kernel and the server down, leaving no process behind.

Every wait is bounded by STEP so that a hung server fails the test instead of hanging the suite;
no test measures how long anything took."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import websocket  # websocket-client
from jupyter_client.kernelspec import KernelSpecManager

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.name for p in (ROOT / "chapters").glob("*.ipynb"))
KERNEL = "minipeft"  # the kernel `make setup` registers, named after the project
STEP = 180  # seconds allowed for one step (server up, kernel up, one cell, shutdown): a bound, not a measurement
WIDGETS = "@jupyter-widgets/jupyterlab-manager"  # JupyterLab's widget manager (jupyterlab_widgets)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


def make_lab(*args: str, scale: str, lab_args: str = "", dry_run: bool = False, **popen) -> subprocess.Popen:
    """`make lab` with this interpreter's environment (BIN) and without re-running setup (-o setup)."""
    cmd = ["make", "-s", "--no-print-directory", "-o", "setup", "lab", f"BIN={Path(sys.executable).parent}"]
    cmd += [f"LAB_ARGS={lab_args}", *args] + (["-n"] if dry_run else [])
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under `make test`
    return subprocess.Popen(cmd, cwd=ROOT, env={**env, "MINIPEFT_SCALE": scale, **popen.pop("env", {})}, **popen)


def test_every_chapter_names_the_kernel_that_setup_registers():
    registered = re.findall(r"ipykernel install --sys-prefix --name (\S+)", (ROOT / "Makefile").read_text())
    assert registered == [KERNEL], registered
    assert CHAPTERS
    for chapter in CHAPTERS:
        spec = json.loads((ROOT / "chapters" / chapter).read_text())["metadata"].get("kernelspec", {})
        assert (spec.get("name"), spec.get("language")) == (KERNEL, "python"), f"{chapter}: kernelspec {spec}"
    # ...and that kernel is this environment's Python (run `make setup` if it is missing).
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    assert Path(spec.resource_dir).is_relative_to(sys.prefix), spec.resource_dir
    assert Path(spec.argv[0]).parent == Path(sys.executable).parent, spec.argv


def test_lab_keeps_the_hub_offline_at_tiny_scale_only():
    commands = {}
    for scale in ("tiny", "full"):
        dry = make_lab(scale=scale, dry_run=True, stdout=subprocess.PIPE, text=True)
        out, _ = dry.communicate(timeout=STEP)
        assert dry.returncode == 0
        commands[scale] = " ".join(out.replace("\\\n", " ").strip().splitlines()[-1].split())
    bin_dir = Path(sys.executable).parent
    assert commands["tiny"].startswith(f"{bin_dir}/jupyter lab --ServerApp.root_dir=chapters"), commands
    assert commands["full"] == f"env -u HF_HUB_OFFLINE {commands['tiny']}", commands


def request(base: str, token: str, method: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Authorization": f"token {token}"})
    with NO_PROXY.open(req, timeout=STEP) as response:
        raw = response.read()
        return response.status, (json.loads(raw) if raw and "json" in response.headers.get("Content-Type", "") else raw)


def wait_for(predicate, what: str, server: subprocess.Popen, log: Path):
    deadline = time.monotonic() + STEP
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"`make lab` exited ({server.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {STEP} s:\n{log.read_text()[-3000:]}")


def execute(ws: websocket.WebSocket, session: str, code: str) -> list[dict]:
    """Send one execute_request on the kernel's channels websocket; return the messages it caused,
    up to the kernel going idle after its reply."""
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "session": session, "username": "test", "version": "5.3"}
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False}
    ws.send(json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell"}))
    replies, idle, replied = [], False, False
    while not (idle and replied):  # each recv is bounded by the socket's timeout (STEP)
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        replies.append(msg)
        replied |= msg["msg_type"] == "execute_reply"
        idle |= msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
    return replies


def status_without_token(base: str) -> int:
    """GET /api/status as a stranger on the machine would: the status code."""
    try:
        with NO_PROXY.open(base + "/api/status", timeout=STEP) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


KERNEL_CODE = """
import json, os, sys
import minipeft
from minipeft.data import scale
print(json.dumps({"prefix": sys.prefix, "minipeft": minipeft.__file__, "scale": scale(), "cwd": os.getcwd(),
                  "hf_offline": os.environ.get("HF_HUB_OFFLINE"), "pid": os.getpid()}))
"""


def test_make_lab_serves_the_chapters_with_the_project_kernel(tmp_path):
    token = secrets.token_hex(16)
    runtime = tmp_path / "runtime"
    # The server's and the kernel's own folders live in tmp_path: the test touches no user settings.
    env = {
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }
    lab_args = f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port=0 --IdentityProvider.token={token}"
    log_path = tmp_path / "server.log"
    log = log_path.open("w")
    # Full scale: the kernel must inherit it (tiny is also the default), and see the hub reachable.
    server = make_lab(scale="full", lab_args=lab_args, env=env, stdout=log, stderr=subprocess.STDOUT,
                      start_new_session=True)  # its own process group: everything it starts can be found
    kernel_pid = None
    try:
        info = wait_for(lambda: sorted(runtime.glob("jpserver-*.json")), "server info file", server, log_path)
        base = "http://127.0.0.1:{port}".format(**json.loads(info[0].read_text()))

        def status():
            try:
                return request(base, token, "GET", "/api/status")[0] == 200
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(status, "answer from /api/status", server, log_path)
        assert status_without_token(base) == 403, "the server answered without the token"

        # The root is chapters/: every chapter is there, and opens as a notebook naming the project's kernel.
        _, listing = request(base, token, "GET", "/api/contents/")
        assert sorted(i["name"] for i in listing["content"] if i["type"] == "notebook") == CHAPTERS
        for chapter in CHAPTERS:
            _, nb = request(base, token, "GET", f"/api/contents/{chapter}?type=notebook&content=1")
            assert nb["type"] == "notebook" and nb["content"]["cells"], chapter
            assert nb["content"]["metadata"]["kernelspec"]["name"] == KERNEL, chapter

        # The page JupyterLab serves loads the widget manager, so widgets are live in it.
        _, page = request(base, token, "GET", "/lab")
        config = json.loads(re.search(rb'id="jupyter-config-data"[^>]*>\s*(.*?)\s*</script>', page, re.S).group(1))
        widgets = [e for e in config["federated_extensions"] if e["name"] == WIDGETS]
        assert widgets, [e["name"] for e in config["federated_extensions"]]
        assert request(base, token, "GET", f"/lab/extensions/{WIDGETS}/{widgets[0]['load']}")[0] == 200

        status_code, kernel = request(base, token, "POST", "/api/kernels", {"name": KERNEL, "path": ""})
        assert status_code == 201 and kernel["name"] == KERNEL
        session = uuid.uuid4().hex
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{base.rsplit(':', 1)[1]}/api/kernels/{kernel['id']}/channels?session_id={session}",
            header=[f"Authorization: token {token}"], timeout=STEP,
        )
        try:
            replies = execute(ws, session, KERNEL_CODE)
            reply = next(m for m in replies if m["msg_type"] == "execute_reply")["content"]
            assert reply["status"] == "ok", reply
            out = "".join(m["content"]["text"] for m in replies if m["msg_type"] == "stream")
            seen = json.loads(out.strip().splitlines()[-1])
            kernel_pid = seen["pid"]
            assert seen["prefix"] == sys.prefix  # this environment, not some other python3
            assert Path(seen["minipeft"]).parent == ROOT / "minipeft"  # this checkout (editable install)
            assert Path(seen["cwd"]) == ROOT / "chapters"
            assert seen["scale"] == "full" and seen["hf_offline"] is None

            # A widget: the kernel opens its comm and the cell's result is the widget's view.
            replies = execute(ws, session, "import ipywidgets\nipywidgets.IntSlider(value=3)")
            opened = [m["content"]["target_name"] for m in replies if m["msg_type"] == "comm_open"]
            assert "jupyter.widget" in opened, [m["msg_type"] for m in replies]
            result = next(m for m in replies if m["msg_type"] == "execute_result")["content"]["data"]
            assert "application/vnd.jupyter.widget-view+json" in result
        finally:
            ws.close()

        assert request(base, token, "DELETE", f"/api/kernels/{kernel['id']}")[0] == 204
        wait_for(lambda: not alive(kernel_pid), "end of the kernel process", server, log_path)
        assert request(base, token, "GET", "/api/kernels")[1] == []
        assert request(base, token, "POST", "/api/shutdown")[0] == 200
        assert server.wait(timeout=STEP) == 0, log_path.read_text()[-3000:]
        assert group_members(server.pid) == []  # make, jupyter lab and whatever they started are gone
    finally:  # only does something if a step above failed
        if server.poll() is None:  # stop the server as Ctrl-C would (it shuts its kernels down), then harder
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=STEP)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=STEP)
        if kernel_pid is not None and alive(kernel_pid):  # kernels run in a process group of their own
            os.killpg(kernel_pid, signal.SIGKILL)
        log.close()

