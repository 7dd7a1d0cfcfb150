"""play.py: a live server on the shipped tiny model driven over HTTP (actions, state, reset, save, the
stream, bad input, two players at once), its frames equal to infer.py's for the same steps, the saved
camera file replayed by infer.py, and a real browser (headless Chromium) pressing keys."""
import base64
import http.client
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

import data
import infer

from helpers import ROOT, run

ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
SCENE = 1_000_000_003  # play.py's default scene and seed 0: infer.py's defaults too


class Server:
    """play.py in a subprocess on a free port (--port=0; the URL comes from its first line)."""

    def __init__(self, out_dir, *args):
        self.log = open(out_dir / "server.log", "w+")
        self.out = out_dir / "game"
        self.proc = subprocess.Popen([sys.executable, "play.py", "--port=0", f"--out={self.out}", *args], cwd=ROOT,
                                     env=ENV, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        for _ in range(1200):  # the model loads in seconds; wait up to two minutes on a busy machine
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", open(out_dir / "server.log").read())
            if m or self.proc.poll() is not None:
                break
            time.sleep(0.1)
        assert m, open(out_dir / "server.log").read()[-2000:]
        self.url, self.port = m.group(0), int(m.group(1))

    def call(self, method, path, body=None, headers=None):
        """-> (status, JSON answer)"""
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def act(self, action, fmt="png", client=None):
        q = f"?format={fmt}" + (f"&client={client}" if client else "")
        status, answer = self.call("POST", "/action" + q, action)
        assert status == 200, answer
        return answer

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("play"))
    yield s
    s.stop()


def decode(images):
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in images])  # (T, H, W, 3)


def play(server, actions):
    """Reset, then one request per action string -> all frames (T, 32, 32, 3) uint8 and the answers."""
    assert server.call("POST", "/reset", "")[0] == 200
    answers = [server.act(a) for a in actions]
    return np.concatenate([decode(a["images"]) for a in answers]), answers


def infer_frames(actions, **overrides):
    """infer.py's own rollout of an action string, in process: its Stream over the path's chunks."""
    cfg = infer.Config(actions=actions, **overrides)
    net, codec, _ = infer.load_model(cfg, torch.device("cpu"))
    path = infer.load_path(cfg, actions)
    stream = infer.open_stream(cfg, net, codec, path)
    chunk = net.cfg.chunk
    return np.concatenate([stream.step(path.frames(s, s + chunk)) for s in range(0, path.num_frames, chunk)])


def gif_frames(path):
    return np.stack(imageio.mimread(path, memtest=False))


def as_gif(frames, path):
    """Frames through infer.py's own writer (8x nearest upscale, then GIF's palette) -> decoded frames."""
    out = data.Writers(str(path), 8, frames.shape[1])
    for f in frames:
        out.append(f)
    out.close()
    return gif_frames(str(path) + ".gif")


# ----------------------------------------------------------------------------------------------
# the protocol


def test_frames_follow_the_keys_and_equal_infer(server, tmp_path):
    # one request per chunk: the first chunk takes 1 step (frame 0 is given), each later one 2 ("w" = "w,w")
    frames, answers = play(server, ["w", "w", "w", "l", "l*2", "x"])
    assert [a["frames"] for a in answers] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert [a["steps"] for a in answers] == [["w"], ["w", "w"], ["w", "w"], ["l", "l"], ["l", "l"], ["x", "x"]]
    assert frames.shape == (12, 32, 32, 3) and frames.dtype == np.uint8
    assert answers[2]["pose"]["z"] == pytest.approx(1.25) and answers[4]["pose"]["yaw_deg"] == pytest.approx(20.0)
    # the same steps through infer.py's rollout: equal pixel for pixel
    same = infer_frames("w*5,l*4,x*2")
    assert np.array_equal(frames, same)
    # and through the infer.py command: its GIF equals our frames through the same writer
    r = run(["infer.py", "--actions=w*5,l*4,x*2", f"--out={tmp_path}/infer.mp4"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(gif_frames(f"{tmp_path}/infer.gif"), as_gif(frames, tmp_path / "ours"))
    # frames change with the action: walking moves the picture more than standing still, compared at the
    # scale of objects (8x8-pixel means): the model redraws fine grain every frame even standing still
    still, _ = play(server, ["x"] * 6)
    assert np.array_equal(still[0], frames[0])  # the same first frame
    coarse = lambda f: f.astype(float).reshape(4, 8, 4, 8, 3).mean((1, 3))  # (32, 32, 3) -> (4, 4, 3)
    # frame 11: five steps forward and a 20-degree turn away from frame 0, against 11 frames standing still
    walked = np.abs(coarse(frames[11]) - coarse(frames[0])).mean()
    stood = np.abs(coarse(still[11]) - coarse(still[0])).mean()
    assert walked > 2 * stood and walked > 4, (walked, stood)


def test_state_and_reset(server):
    play(server, ["w", "wl", "d"])
    status, s = server.call("GET", "/state")
    assert status == 200 and s["frame_count"] == 6 and s["chunks"] == 3 and s["action"] == "d"
    assert s["scene_seed"] == SCENE and s["size"] == [32, 32] and len(s["path"]) == 3 and s["busy"] is False
    again, _ = play(server, ["w"])  # a reset replays the same game: same scene, same noise
    first, _ = play(server, ["w"])
    assert np.array_equal(again, first)
    status, s = server.call("POST", "/reset", json.dumps({"scene": "new"}))
    assert status == 200 and s["scene_seed"] == SCENE + 1 and s["frame_count"] == 0
    other = decode(server.act("w")["images"])
    assert np.abs(other[0].astype(int) - first[0]).mean() > 10  # another scene
    status, s = server.call("POST", "/reset", json.dumps({"scene_seed": SCENE}))
    assert status == 200 and s["scene_seed"] == SCENE
    assert np.array_equal(decode(server.act("w")["images"]), first)


def test_save_writes_a_game_that_infer_replays(server, tmp_path):
    frames, _ = play(server, ["w", "l", "wj", "i", "d"])  # 10 frames
    status, saved = server.call("POST", "/save")
    assert status == 200 and saved["frames"] == 10
    mp4, gif, cams_json, path_png = saved["files"]
    assert all(os.path.getsize(f) > 0 for f in saved["files"])
    assert len(imageio.mimread(mp4, memtest=False)) == 10
    assert np.array_equal(gif_frames(gif), as_gif(frames, tmp_path / "ours"))
    doc = json.load(open(cams_json))
    assert doc["convention"] == "opencv" and doc["pose"] == "w2c" and len(doc["frames"]) == 10
    # the replay command infer.py runs from the camera file gives the same frames
    args = shlex.split(saved["replay"])
    assert args[:2] == ["python", "infer.py"]
    args = [a for a in args[2:] if not a.startswith("--out=")] + [f"--out={tmp_path}/replay.mp4"]
    r = run(["infer.py"] + args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(gif_frames(f"{tmp_path}/replay.gif"), gif_frames(gif))
    # a second save does not clobber the first
    status, again = server.call("POST", "/save")
    assert status == 200 and again["files"][0] != mp4 and os.path.exists(mp4)


def test_stream_sends_the_frames_as_they_are_made(server):
    play(server, ["x"])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/stream?format=png")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "multipart/x-mixed-replace; boundary=frame"

    def part():
        assert r.fp.readline() == b"--frame\r\n"
        head = dict(line.decode().strip().split(": ", 1) for line in iter(r.fp.readline, b"\r\n"))
        data = r.fp.read(int(head["Content-Length"]))
        assert r.fp.readline() == b"\r\n"
        return head["Content-Type"], np.asarray(Image.open(io.BytesIO(data)))

    ctype, latest = part()  # the latest frame at once
    assert ctype == "image/png" and latest.shape == (32, 32, 3)
    made = decode(server.act("w")["images"])
    streamed = [part()[1] for _ in range(len(made))]
    assert np.array_equal(np.stack(streamed), made)
    conn.close()  # a watcher leaving mid-stream: the server goes on
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/stream")  # MJPEG
    r = conn.getresponse()
    ctype, jpeg = part()
    assert ctype == "image/jpeg" and jpeg.shape == (32, 32, 3)
    assert np.abs(jpeg.astype(int) - made[-1]).mean() < 3  # JPEG at quality 95: close to the exact frame
    conn.close()
    assert server.call("GET", "/state")[0] == 200


BAD_REQUESTS = [  # (method, path, body, headers, status, words in the error)
    ("POST", "/action", "q", {}, 400, "unknown action letter"),
    ("POST", "/action", "", {}, 400, "empty action string"),
    ("POST", "/action", "w*999999999", {}, 400, "more than 64 steps"),
    ("POST", "/action", "w" * 100_000, {}, 413, "body too large"),
    ("POST", "/action", b"\xff\xfe\x00garbage", {}, 400, "not UTF-8"),
    ("POST", "/action?format=bmp", "w", {}, 400, "format must be"),
    ("POST", "/reset", "{not json", {}, 400, "not JSON"),
    ("POST", "/reset", "[1, 2]", {}, 400, "reset body"),
    ("POST", "/reset", '{"scene_seed": -1}', {}, 400, "non-negative integer"),
    ("POST", "/reset", '{"scene": "elsewhere"}', {}, 400, "scene must be"),
    ("GET", "/nowhere", None, {}, 404, "no GET /nowhere"),
    ("GET", "/stream?format=none", None, {}, 400, "no frames"),
]


def test_bad_input_gets_a_4xx_and_changes_nothing(server):
    play(server, ["w", "l"])
    before = server.call("GET", "/state")[1]
    for method, path, body, headers, code, words in BAD_REQUESTS:
        status, answer = server.call(method, path, body, headers)
        assert (status, words) == (code, words) and words in answer["error"], (path, body, answer)
        assert "\n" not in answer["error"]
    # malformed HTTP: a garbage request line, binary noise, a bad Content-Length, a chunked body
    for raw in (b"GARBAGE\r\n\r\n", bytes(range(256)) * 4 + b"\r\n\r\n",
                b"POST /action HTTP/1.1\r\nContent-Length: lots\r\n\r\nw",
                b"POST /action HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nw\r\n0\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
            s.sendall(raw)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        status_line, _, rest = reply.partition(b"\r\n")
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", status_line), reply[:200]
        assert "error" in json.loads(rest.partition(b"\r\n\r\n")[2])
    # a client that hangs up mid-request
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /action HTTP/1.1\r\nContent-Length: 10\r\n\r\nw")
    after = server.call("GET", "/state")[1]
    assert after["frame_count"] == before["frame_count"] == 4 and after["chunks"] == 2
    assert server.act("w")["frames"] == [4, 5]  # and it still plays


def test_one_generation_at_a_time(server):
    play(server, ["x"])
    answers = []

    def ask():
        answers.append(server.call("POST", "/action?format=none", "w*8"))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [a for s, a in answers if s == 200]
    busy = [a for s, a in answers if s == 409]
    assert len(made) >= 1 and len(made) + len(busy) == 4
    assert all(a["error"].startswith("busy:") for a in busy)
    assert server.call("GET", "/state")[1]["frame_count"] == 2 + sum(len(a["frames"]) for a in made)
    # a second tab while the first one plays: told it watches; a script without a name only takes turns
    server.act("x", client="tab1")
    status, answer = server.call("POST", "/action?client=tab2", "w")
    assert status == 409 and "another tab is playing" in answer["error"]
    # the driving tab's second request in flight waits for the chunk before it (the page keeps two going)
    before, answers = server.call("GET", "/state")[1]["frame_count"], []
    threads = [threading.Thread(target=lambda: answers.append(server.call("POST", "/action?format=none&client=tab1",
                                                                          "w*8"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in answers] == [200, 200]
    assert sorted(f for _, a in answers for f in a["frames"]) == list(range(before, before + 16))
    assert server.act("x", fmt="none")["frames"]


def test_command_line_errors_are_one_line(tmp_path):
    for args, words in ((["--port=70000"], "--port must be in 0..65535"), (["--bogus=1"], "unknown flag --bogus"),
                        ([f"--ckpt={tmp_path}/none"], "none"), (["--sampler=fast"], "--sampler must be")):
        r = run(["play.py", *args])
        assert r.returncode == 2 and r.stderr.startswith("error: ") and words in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    with socket.socket() as taken:  # a port someone else holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = run(["play.py", f"--port={taken.getsockname()[1]}"])
    assert r.returncode == 2 and r.stderr.startswith("error: cannot listen on 127.0.0.1:"), r.stderr


# ----------------------------------------------------------------------------------------------
# a real browser


CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1000,760"]


def browser(tmp_path):
    """Headless Chromium driven by selenium, or a skip that says what is missing."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless browser here: apt-get install -y chromium chromium-driver (.ci/run does)")
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed: pip install selenium (requirements.txt lists it)")
    os.environ["SE_OFFLINE"] = "true"  # selenium must not look for drivers on the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path}/chromium"]:
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))


def test_browser_plays_with_keys(server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    assert server.call("POST", "/reset", "")[0] == 200
    drv = browser(tmp_path)
    try:
        drv.set_page_load_timeout(60)
        drv.get(server.url)  # the page starts playing at once: no key held, so "x"
        counter = lambda: int(drv.find_element(By.ID, "frames").text)
        wait = WebDriverWait(drv, 120, poll_frequency=0.1)
        wait.until(lambda d: counter() >= 6)
        view = drv.find_element(By.ID, "view")
        assert view.value_of_css_property("image-rendering") == "pixelated"
        before, n0 = np.asarray(Image.open(io.BytesIO(view.screenshot_as_png)).convert("RGB")), counter()
        assert server.call("GET", "/state")[1]["pose"]["z"] == 0  # standing still
        ActionChains(drv).key_down("w").perform()  # hold W: walk until 1.5 m forward
        wait.until(lambda d: server.call("GET", "/state")[1]["pose"]["z"] >= 1.5)
        held_action = drv.find_element(By.ID, "action").text
        ActionChains(drv).key_up("w").key_down(Keys.ARROW_LEFT).perform()  # then turn left for a while
        wait.until(lambda d: server.call("GET", "/state")[1]["pose"]["yaw_deg"] <= -25)
        ActionChains(drv).key_up(Keys.ARROW_LEFT).perform()
        wait.until(lambda d: counter() >= n0 + 12)
        after = np.asarray(Image.open(io.BytesIO(view.screenshot_as_png)).convert("RGB"))
        assert held_action in ("w", "wl") and counter() > n0
        assert before.shape[0] >= 500 and np.abs(after.astype(int) - before).mean() > 5  # the picture moved
        wait.until(lambda d: re.fullmatch(r"\d+\.\d", d.find_element(By.ID, "fps").text))
        assert float(drv.find_element(By.ID, "fps").text) > 0
        assert re.fullmatch(r"\d+ ms", drv.find_element(By.ID, "keylag").text)  # key to frames, measured
        # the README's picture: MINWM_SCREENSHOT=assets/play.png python -m pytest tests/test_play.py -k browser
        drv.save_screenshot(os.environ.get("MINWM_SCREENSHOT") or str(tmp_path / "play.png"))
    finally:
        drv.quit()
