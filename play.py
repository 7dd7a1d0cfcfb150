"""Play the world model live in a browser: keys in, frames out, one chunk per request.

    python play.py                                   # the shipped model on http://127.0.0.1:8000
    python play.py --port 8080 --scene_seed 1000000007
    python play.py --ckpt out/dmd --image first.png --host 0.0.0.0 --port 0   # port 0: any free port

Keys: W/S forward/back, A/D strafe, J/L or arrows left/right turn, I/K or arrows up/down look up/down,
U/N up/down; keys held together act in the same step ("wl"); while a key is held the page keeps
asking for chunks, with no key held it asks for "x" (the camera stays still). Space pauses; a
hidden tab pauses by itself.

Protocol (the standard library's HTTP server; answers are JSON; a bad request gets a 4xx and
{"error": "one line"}, a browser closed mid-stream is a quiet disconnect; the server keeps serving):
  GET  /              the page: one HTML file with a little inline JavaScript
  GET  /stream        the frames as they are made, MJPEG (multipart/x-mixed-replace; ?format=png for
                      PNG parts, which the page uses: exact pixels). Any number of tabs may watch.
  POST /action        body: an action string as `infer.py --actions` takes it ("w", "wl", "l*2,w").
                      Its steps fill chunks: a game's first chunk takes chunk - 1 steps (frame 0 is the
                      given first frame), every later one `chunk` steps; the last chunk is padded with
                      its last step, so "w" is one chunk of walking. At most MAX_STEPS steps.
                      -> {"chunk", "frames" (indices made), "frame_count", "latency_ms", "steps" (as played,
                          padding included), "pose"}
                      ?format=png (or jpeg) adds "images": base64 files of those frames at native size.
                      One generation at a time. ?client=ID (each tab sends one): the tab whose action was
                      answered in the last HOLD_S seconds drives, and its request that comes while a chunk
                      is being made waits for it (the page keeps two in flight, so the next chunk starts
                      the moment one ends); another tab gets 409 {"error": "busy: ..."} and watches
                      /stream. Requests without an ID (scripts) only take turns: busy -> 409.
  GET  /state         {"frame_count", "chunks", "scene_seed", "seed", "action", "latency_ms", "pose"
                       (x, y, z metres, yaw and pitch degrees), "path" (x, z per chunk, thinned), "busy", ...}
  POST /reset         back to frame 0. Body: nothing (same scene), {"scene": "new"} (the next seed) or
                      {"scene_seed": N}.
  POST /save          writes OUT_NNN.mp4, OUT_NNN.gif, OUT_NNN_cameras.json (camera JSON v1) and
                      OUT_NNN_path.png of the game so far -> {"files", "frames", "replay"}; `replay` is the
                      infer.py command that makes the same frames again from the camera file.

Memory is flat however long a game runs: the KV cache holds sink + window latent frames, the frames
played and their cameras go to two raw files in a temporary folder (on disk, H·W·3 + 80 bytes a
frame; /save reads them back, a reset starts them again, the folder goes when the server stops), and
the map's path is thinned to at most MAX_PATH points. The rollout is `infer.Stream`, the same object
`infer.py` steps, so a game equals `infer.py --actions` of its steps, frame for frame.
"""
import base64
import collections
import dataclasses
import io
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import numpy as np
import torch

import cameras
import common
import data
import infer
from prope import Cameras

MAX_BODY = 4096  # bytes of a request body; larger: 413
MAX_STEPS = 64  # action steps per request
HOLD_S = 2.0  # a tab that sent an action this recently keeps the keys
QUEUE_S = 2.0  # a tab's request that comes while its previous chunk is being made waits this long for it
MAX_PATH = 1024  # map points kept (then every other one is dropped)


@dataclass
class Config(infer.StreamConfig):
    host: str = "127.0.0.1"  # 0.0.0.0 to let other machines play
    port: int = 8000  # 0: any free port (the URL printed says which)
    out: str = "out/play"  # /save writes OUT_001.mp4, ...


class Busy(Exception):
    """Someone else holds the game: 409 with this message."""


class Game:
    """The one rollout the server plays: the Stream, the walker, the recording, the stats, the locks."""

    def __init__(self, cfg, net, codec, ckpt):
        self.cfg, self.net, self.codec, self.ckpt = cfg, net, codec, ckpt
        self.lock = threading.Lock()  # one chunk (or reset, or save) at a time
        self.new_frame = threading.Condition()  # wakes the /stream watchers
        self.recent = collections.deque(maxlen=16)  # (seq, frame (H, W, 3) uint8, time to show it)
        self.seq = 0  # frames pushed to the watchers, across resets
        self.driver, self.driven_at = "", 0.0  # the tab that sent the last action, and when it was answered
        self.doing, self.holder = "", ""  # what the lock is held for, and by which client
        self.dir = tempfile.mkdtemp(prefix="minwm_play_")
        self.reset(cfg.scene_seed)

    # ---- the game

    def reset(self, scene_seed):
        """Frame 0 of scene_seed: a fresh stream, walker, recording and map (call under self.lock)."""
        self.cfg = dataclasses.replace(self.cfg, scene_seed=scene_seed)
        if hasattr(self, "frames_file"):
            self.frames_file.close()
            self.cams_file.close()
        self.walk = infer.walker(self.cfg)
        self.stream = infer.open_stream(self.cfg, self.net, self.codec, infer.load_path(self.cfg, "x"))
        self.frames_file = open(os.path.join(self.dir, "frames.u8"), "wb")  # (H, W, 3) uint8 per frame
        self.cams_file = open(os.path.join(self.dir, "cameras.f32"), "wb")  # w2c (16) + K (4) per latent frame
        self.frame_count, self.chunks, self.action, self.latency, self.frame_shape = 0, 0, "", 0.0, None
        self.path, self.path_stride = [], 1
        self.push([((self.stream.frame0 + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()], 0.0)  # a preview

    def play(self, steps):
        """Steps -> chunks through the stream (call under self.lock) -> (frames made (T, H, W, 3), steps played)."""
        chunk, out, played = self.net.cfg.chunk, [], []
        need = chunk - 1 if self.stream.start == 0 else chunk  # frame 0 needs no step
        while steps:
            part, steps = steps[:need], steps[need:]
            part = part + [part[-1]] * (need - len(part)) if part else []  # pad with the last step
            cams = self.walk.cameras(part, self.cfg.width, self.cfg.height)  # (1, n) of the next frames
            frames = self.stream.step(cams)
            self.record(frames, cams)
            self.push(frames, self.stream.latency)
            out.append(frames)
            played += part
            need = chunk
        return np.concatenate(out), played

    def record(self, frames, cams):
        self.frames_file.write(frames.tobytes())
        self.cams_file.write(torch.cat([cams.w2c[0].flatten(1), cams.K[0]], 1).numpy().astype(np.float32).tobytes())
        self.frame_count += len(frames)
        self.frame_shape = frames.shape[1:]
        self.chunks += 1
        self.latency = self.stream.latency
        if self.chunks % self.path_stride == 0:  # the map: one point per chunk, thinned as it grows
            self.path.append([round(float(self.walk.pos[0]), 3), round(float(self.walk.pos[2]), 3)])
            if len(self.path) > MAX_PATH:
                self.path, self.path_stride = self.path[::2], self.path_stride * 2

    def push(self, frames, latency):
        """Hand frames to the watchers, spaced over the chunk's latency so they play at the rate made."""
        now = time.monotonic()
        with self.new_frame:
            for k, frame in enumerate(frames):
                self.seq += 1
                self.recent.append((self.seq, frame, now + k * latency / len(frames)))
            self.new_frame.notify_all()

    def next_frame(self, after, timeout=5.0):
        """The first frame pushed after seq `after` (waiting up to timeout), else the latest one again."""
        with self.new_frame:
            self.new_frame.wait_for(lambda: self.seq > after, timeout)
            newer = [item for item in self.recent if item[0] > after]
            return newer[0] if newer else self.recent[-1]

    def pose(self):
        w = self.walk
        return {"x": round(float(w.pos[0]), 3), "y": round(float(-w.pos[1]), 3), "z": round(float(w.pos[2]), 3),
                "yaw_deg": round(math.degrees(w.yaw), 2), "pitch_deg": round(math.degrees(w.pitch), 2)}

    def state(self):
        return {"frame_count": self.frame_count, "latent_frames": self.stream.start, "chunks": self.chunks,
                "scene_seed": self.cfg.scene_seed, "seed": self.cfg.seed, "image": self.cfg.image,
                "action": self.action, "latency_ms": round(self.latency * 1000, 1), "pose": self.pose(),
                "path": self.path, "busy": self.lock.locked(), "doing": self.doing, "chunk": self.net.cfg.chunk,
                "size": [self.cfg.height, self.cfg.width], "sink": self.cfg.sink, "window": self.cfg.window,
                "ckpt": self.ckpt}

    # ---- holding the game

    def hold(self, doing, client="", wait=0.0):
        """Take the lock for `doing` (waiting up to `wait` s) or raise Busy. A named client (a tab) other than
        the driver is refused until the driver has been quiet for HOLD_S; requests without a name (scripts)
        only take turns."""
        if client and self.driver not in ("", client) and time.monotonic() - self.driven_at < HOLD_S:
            raise Busy("busy: another tab is playing (it has the keys); this one watches")
        got = self.lock.acquire(timeout=wait) if wait else self.lock.acquire(blocking=False)
        if not got:
            raise Busy(f"busy: {self.doing or 'working'}; try again")
        self.doing, self.holder = doing, client

    def release(self):
        if self.holder:  # the hold counts from the end of the driver's last request
            self.driver, self.driven_at = self.holder, time.monotonic()
        self.doing = ""
        self.lock.release()

    # ---- saving

    def save(self):
        """The game so far -> OUT_NNN.mp4/.gif/_cameras.json/_path.png (call under self.lock)."""
        if not self.frame_count:
            raise ValueError("nothing to save yet: play a chunk first")
        self.frames_file.flush()
        self.cams_file.flush()
        n = 1
        while os.path.exists(f"{self.cfg.out}_{n:03d}.mp4"):
            n += 1
        stem = f"{self.cfg.out}_{n:03d}"
        frames = np.memmap(self.frames_file.name, np.uint8, "r", shape=(self.frame_count, *self.frame_shape))
        out = data.Writers(stem, self.cfg.fps, self.cfg.height)
        for frame in frames:  # read back from disk a frame at a time: flat memory
            out.append(np.asarray(frame))
        out.close()
        del frames
        cams = np.fromfile(self.cams_file.name, np.float32).reshape(1, -1, 20)
        cams = Cameras(torch.from_numpy(cams[..., :16].reshape(1, -1, 4, 4).copy()), torch.from_numpy(cams[..., 16:].copy()))
        cameras.save_cameras(stem + "_cameras.json", cams, self.cfg.width, self.cfg.height, self.cfg.fps)
        cameras.plot_trajectory(cams, stem + "_path.png", title=os.path.basename(stem))
        return {"files": [stem + ext for ext in (".mp4", ".gif", "_cameras.json", "_path.png")],
                "frames": self.frame_count, "replay": self.replay_command(stem)}

    def replay_command(self, stem):
        """The infer.py command that makes the saved frames again: the camera file + every flag not at its default."""
        flags = [f"--cameras={stem}_cameras.json", f"--out={stem}_replay.mp4"]
        for f in dataclasses.fields(infer.StreamConfig):
            value = getattr(self.cfg, f.name)  # ckpt "": infer.py finds the same shipped model
            if value != f.default:
                value = ",".join(map(str, value)) if isinstance(value, tuple) else value
                flags.append(f"--{f.name}={value}")
        return "python infer.py " + " ".join(map(shlex.quote, flags))

    def close(self):
        self.frames_file.close()
        self.cams_file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def encode(frame, fmt):
    """A frame (H, W, 3) uint8 -> PNG (lossless) or JPEG bytes at native size; the page scales it up."""
    from PIL import Image
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(frame).save(buf, "PNG", compress_level=1)
    else:
        Image.fromarray(frame).save(buf, "JPEG", quality=95, subsampling=0)  # no chroma blur on tiny frames
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# the HTTP side


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a key's request does not pay for a new connection
    server_version = "minWM-play"
    timeout = 60  # seconds a silent or stalled connection may hold a thread
    game: Game = None  # set by serve()

    # ---- routing

    def do_GET(self):
        if self.headers.get("Content-Length", "0") != "0":
            self.close_connection = True  # a GET with a body: unread, it would be parsed as the next request
        self.route({"/": self.page, "/stream": self.stream, "/state": self.state})

    def do_POST(self):
        self.route({"/action": self.action, "/reset": self.reset, "/save": self.save})

    def route(self, table):
        path, _, query = self.path.partition("?")
        self.query = parse_qs(query)
        try:
            handler = table.get(path)
            if handler is None:
                return self.fail(404, f"no {self.command} {path} (GET /, /stream, /state; POST /action, /reset, /save)")
            handler()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the browser went away: nothing to answer
        except Exception as e:  # a bug must not take the server down: one line here, one line to the client
            traceback.print_exc()
            self.fail(500, f"internal error: {type(e).__name__}: {e}")

    # ---- answers

    def send_bytes(self, code, data, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def reply(self, obj, code=200):
        self.send_bytes(code, (json.dumps(obj) + "\n").encode(), "application/json")

    def fail(self, code, msg):
        msg = " ".join(str(msg).split())
        msg = msg if len(msg) <= 300 else msg[:297] + "..."
        try:
            self.reply({"error": msg}, code)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """The library's own errors (malformed request line or headers) as one JSON line too."""
        if self.request_version == "HTTP/0.9":  # garbage parses as 0.9, which has no status line: answer 1.0
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.fail(code, message or HTTPStatus(code).phrase)

    def log_request(self, code="-", size="-"):
        if isinstance(code, HTTPStatus):
            code = code.value
        if str(code).isdigit() and int(code) >= 400:  # the page asks many times a second: log only failures
            self.log_message('"%s" %s', self.requestline[:120], code)

    def log_message(self, format, *args):
        print(f"play: {self.address_string()} " + format % args, file=sys.stderr, flush=True)

    def body(self):
        """The request body as text, or None after a 4xx (too large, bad length, not UTF-8)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return self.fail(411, "send the body with a Content-Length (no chunked transfer encoding)")
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            self.close_connection = True
            return self.fail(400, f"bad Content-Length {length[:40]!r}")
        n = int(length)
        if n > MAX_BODY:
            if n <= 1 << 20:  # read what was sent so the client sees the answer, not a reset connection
                self.rfile.read(n)
            self.close_connection = True
            return self.fail(413, f"body too large: {n} bytes (at most {MAX_BODY})")
        data = self.rfile.read(n)
        if len(data) < n:  # the client hung up mid-body: nobody to answer
            self.close_connection = True
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return self.fail(400, "body is not UTF-8 text")

    def image_format(self, default):
        fmt = self.query.get("format", [default])[0]
        if fmt not in ("png", "jpeg", "jpg", "none"):
            raise ValueError(f"format must be png or jpeg, got {fmt[:20]!r}")
        return "jpeg" if fmt == "jpg" else fmt

    # ---- the routes

    def page(self):
        self.send_bytes(200, PAGE.encode(), "text/html; charset=utf-8")

    def state(self):
        self.reply(self.game.state())

    def action(self):
        text = self.body()
        if text is None:
            return
        try:
            fmt = self.image_format("none")
            steps = cameras.parse_actions(text.strip(), max_steps=MAX_STEPS)
        except ValueError as e:
            return self.fail(400, e)
        game, client = self.game, self.query.get("client", [""])[0][:64]
        try:
            game.hold("making a chunk", client, wait=QUEUE_S if client else 0.0)
        except Busy as e:
            return self.fail(409, e)
        try:
            first, t0 = game.frame_count, time.perf_counter()
            frames, steps = game.play(steps)
            game.action = text.strip()
            answer = {"chunk": game.chunks, "frames": list(range(first, game.frame_count)),
                      "frame_count": game.frame_count, "latency_ms": round((time.perf_counter() - t0) * 1000, 1),
                      "chunk_latency_ms": round(game.latency * 1000, 1), "steps": steps, "pose": game.pose()}
        finally:
            game.release()
        if fmt != "none":
            answer["images"] = [base64.b64encode(encode(f, fmt)).decode() for f in frames]
        self.reply(answer)

    def reset(self):
        text = self.body()
        if text is None:
            return
        game = self.game
        try:
            seed = self.reset_seed(text, game)
            game.hold("resetting", wait=10.0)
        except ValueError as e:
            return self.fail(400, e)
        except Busy as e:
            return self.fail(409, e)
        try:
            game.reset(seed)
        finally:
            game.release()
        self.reply(game.state())

    def reset_seed(self, text, game):
        """The reset body -> the scene seed to start: same scene, the next one, or a given one."""
        if not text.strip():
            return game.cfg.scene_seed
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"reset body: not JSON ({e})") from None
        if not isinstance(body, dict) or set(body) - {"scene", "scene_seed"}:
            raise ValueError('reset body: give {"scene": "new"} or {"scene_seed": N} (or nothing)')
        if "scene_seed" in body:
            seed = body["scene_seed"]
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
                raise ValueError(f"reset body: scene_seed must be a non-negative integer, got {seed!r}")
            return seed
        if body.get("scene", "same") not in ("new", "same"):
            raise ValueError(f'reset body: scene must be "new" or "same", got {body["scene"]!r}')
        if body.get("scene") == "new":
            if game.cfg.image:
                raise ValueError("a new scene needs the procedural world; this game starts from --image")
            return game.cfg.scene_seed + 1
        return game.cfg.scene_seed

    def save(self):
        if self.body() is None:
            return
        game = self.game
        try:
            game.hold("saving", wait=10.0)
        except Busy as e:
            return self.fail(409, e)
        try:
            answer = game.save()
        except ValueError as e:
            return self.fail(400, e)
        finally:
            game.release()
        print(f"play: saved {answer['frames']} frames: {', '.join(answer['files'])}\n      replay: {answer['replay']}",
              flush=True)
        self.reply(answer)

    def stream(self):
        """MJPEG (or PNG parts): every frame pushed from now on, until the browser goes away."""
        try:
            fmt = self.image_format("jpeg")
            if fmt == "none":
                raise ValueError("format=none has no frames to stream")
        except ValueError as e:
            return self.fail(400, e)
        ctype = "image/png" if fmt == "png" else "image/jpeg"
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.wfile.write(b"--frame\r\n")
        seq = self.game.seq - 1  # start with the latest frame
        while True:
            seq, frame, show_at = self.game.next_frame(seq)
            time.sleep(min(max(0.0, show_at - time.monotonic()), 0.5))
            data = encode(frame, fmt)
            # each part ends with the next boundary, so the browser shows it at once, not when the next one comes
            self.wfile.write(b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n%s\r\n--frame\r\n"
                             % (ctype.encode(), len(data), data))
            self.wfile.flush()


PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>minWM: play</title>
<style>
  body { background: #15171a; color: #d8dade; font: 14px system-ui, sans-serif; margin: 18px; }
  h1 { font-size: 17px; font-weight: 600; margin: 0 0 12px; }
  #row { display: flex; gap: 18px; align-items: flex-start; }
  #view { width: 512px; height: 512px; image-rendering: pixelated; background: #000; border: 1px solid #333; }
  table { border-collapse: collapse; margin-bottom: 10px; }
  td { padding: 3px 10px 3px 0; } td:first-child { color: #8a8f98; }
  #action { font: 600 18px ui-monospace, monospace; color: #ffd27a; }
  #map { background: #1d2024; border: 1px solid #333; display: block; margin-bottom: 10px; }
  button { background: #2a2e34; color: #d8dade; border: 1px solid #444; border-radius: 4px; padding: 5px 10px;
           margin-right: 4px; cursor: pointer; }
  button:hover { background: #353a42; }
  #status { color: #9fd49f; } #status.bad { color: #f08a7a; }
  .keys { color: #8a8f98; max-width: 300px; line-height: 1.5; }
  kbd { border: 1px solid #555; border-radius: 3px; padding: 0 4px; font-size: 12px; }
  #saved { max-width: 300px; word-break: break-all; color: #8a8f98; font-size: 12px; }
</style></head>
<body>
<h1>minWM &middot; a world model you walk through</h1>
<div id="row">
  <img id="view" alt="the world">
  <div>
    <table>
      <tr><td>action</td><td id="action">x</td></tr>
      <tr><td>chunk latency</td><td id="latency">&ndash;</td></tr>
      <tr><td>key &rarr; frames</td><td id="keylag">&ndash;</td></tr>
      <tr><td>FPS</td><td id="fps">&ndash;</td></tr>
      <tr><td>frames</td><td id="frames">0</td></tr>
      <tr><td>scene</td><td id="scene">&ndash;</td></tr>
      <tr><td>status</td><td id="status">starting</td></tr>
    </table>
    <canvas id="map" width="300" height="200"></canvas>
    <div style="margin-bottom:10px">
      <button id="pause">pause</button><button id="reset">reset</button><button id="newscene">new scene</button><button id="save">save</button>
    </div>
    <div class="keys"><kbd>W</kbd><kbd>S</kbd> forward/back &middot; <kbd>A</kbd><kbd>D</kbd> strafe &middot;
      <kbd>J</kbd><kbd>L</kbd> or <kbd>&larr;</kbd><kbd>&rarr;</kbd> turn &middot; <kbd>I</kbd><kbd>K</kbd> or
      <kbd>&uarr;</kbd><kbd>&darr;</kbd> look &middot; <kbd>U</kbd><kbd>N</kbd> up/down &middot; <kbd>space</kbd> pause</div>
    <p id="saved"></p>
  </div>
</div>
<script>
const KEYS = {w: "w", s: "s", a: "a", d: "d", u: "u", n: "n", j: "j", l: "l", i: "i", k: "k",
              ArrowLeft: "j", ArrowRight: "l", ArrowUp: "i", ArrowDown: "k"};
const ORDER = "wsadunjlik";               // letters held together act in one step, in this order
const client = Math.random().toString(36).slice(2);
const held = new Set();
const $ = id => document.getElementById(id);
let paused = false, counts = [], path = [], pose = {x: 0, z: 0, yaw_deg: 0};
let keyAt = null;                          // when the last new key went down, until its frames come

const keyName = e => e.key.length === 1 ? e.key.toLowerCase() : e.key;
addEventListener("keydown", e => {
  if (e.key === " ") { togglePause(); e.preventDefault(); return; }
  if (KEYS[keyName(e)]) {
    if (!held.has(keyName(e))) keyAt = performance.now();
    held.add(keyName(e)); e.preventDefault();
  }
});
addEventListener("keyup", e => held.delete(keyName(e)));
addEventListener("blur", () => held.clear());
function action() {
  const letters = new Set([...held].map(k => KEYS[k]));
  return [...ORDER].filter(c => letters.has(c)).join("") || "x";
}
function status(text, bad) { $("status").textContent = text; $("status").className = bad ? "bad" : ""; }
function togglePause() { paused = !paused; $("pause").textContent = paused ? "resume" : "pause"; }
const sleep = ms => new Promise(r => setTimeout(r, ms));

async function post(url, body) {
  const r = await fetch(url, {method: "POST", body: body || ""});
  return [r, await r.json()];
}

// the game loop: one chunk per request, as fast as the server makes them. Two loops run, so one request
// waits at the server while the other's chunk is made: the next chunk starts the moment one ends, not a
// round trip (and the browser's drawing) later
async function loop() {
  for (;;) {
    if (paused || document.hidden) { status(paused ? "paused" : "hidden"); await sleep(100); continue; }
    const a = action(), sentAt = performance.now();
    try {
      const [r, j] = await post("/action?client=" + client, a);
      if (r.ok && keyAt !== null && keyAt <= sentAt) {  // the first frames made with the new key
        $("keylag").textContent = (performance.now() - keyAt).toFixed(0) + " ms";
        keyAt = null;
      }
      if (r.ok) {
        $("action").textContent = a;
        $("latency").textContent = j.chunk_latency_ms.toFixed(0) + " ms";
        showFrames(j.frame_count);
        pose = j.pose;
        status("playing");
      } else {
        status(j.error, r.status !== 409);
        await sleep(300);
      }
    } catch (e) { status("no answer from the server", true); await sleep(1000); }
  }
}

// frames and FPS: frames made in the last two seconds of wall time
function showFrames(n) {
  const now = performance.now();
  if (counts.length && n < counts[counts.length - 1][1]) counts = [];  // a reset
  counts.push([now, n]);
  while (counts.length > 2 && now - counts[0][0] > 2000) counts.shift();
  $("frames").textContent = n;
  const [t0, n0] = counts[0];
  if (now > t0 + 250) $("fps").textContent = ((n - n0) * 1000 / (now - t0)).toFixed(1);
}

// the state (for watching tabs too): frames, scene, the path for the map
async function poll() {
  for (;;) {
    try {
      const s = await (await fetch("/state")).json();
      showFrames(s.frame_count);
      $("scene").textContent = s.image ? s.image : s.scene_seed;
      if (s.action) $("action").textContent = s.action;
      path = s.path; pose = s.pose;
      drawMap();
    } catch (e) {}
    await sleep(400);
  }
}

// the top-down map: x to the right, z (forward at the start) up, the camera as an arrow
function drawMap() {
  const c = $("map"), g = c.getContext("2d"), pts = path.concat([[pose.x, pose.z]]);
  g.clearRect(0, 0, c.width, c.height);
  let lo = [Math.min(...pts.map(p => p[0])), Math.min(...pts.map(p => p[1]))];
  let hi = [Math.max(...pts.map(p => p[0])), Math.max(...pts.map(p => p[1]))];
  const span = Math.max(hi[0] - lo[0], hi[1] - lo[1], 2) * 1.2;
  const s = Math.min(c.width, c.height) / span, mid = [(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2];
  const px = p => [c.width / 2 + (p[0] - mid[0]) * s, c.height / 2 - (p[1] - mid[1]) * s];
  g.strokeStyle = "#6b8fd6"; g.lineWidth = 2; g.beginPath();
  pts.forEach((p, i) => { const [x, y] = px(p); i ? g.lineTo(x, y) : g.moveTo(x, y); });
  g.stroke();
  const [x0, y0] = px([0, 0]);
  g.fillStyle = "#6b8fd6"; g.beginPath(); g.arc(x0, y0, 3, 0, 7); g.fill();   // the start
  const [x, y] = px([pose.x, pose.z]), yaw = pose.yaw_deg * Math.PI / 180;
  g.fillStyle = "#ffd27a"; g.beginPath();                  // yaw turns +z towards +x: right on the map
  g.moveTo(x + 14 * Math.sin(yaw), y - 14 * Math.cos(yaw));
  g.lineTo(x + 7 * Math.sin(yaw + 2.5), y - 7 * Math.cos(yaw + 2.5));
  g.lineTo(x + 7 * Math.sin(yaw - 2.5), y - 7 * Math.cos(yaw - 2.5));
  g.fill();
  g.fillStyle = "#8a8f98"; g.fillText(path.length ? "top view, " + span.toFixed(0) + " m across" : "top view", 6, 14);
}

async function reset(body) {
  try {
    const [r, j] = await post("/reset", body);
    if (!r.ok) return status(j.error, true);
    counts = []; path = j.path; pose = j.pose; showFrames(0); drawMap();
    $("scene").textContent = j.image ? j.image : j.scene_seed;
  } catch (e) { status("no answer from the server", true); }
}
$("pause").onclick = togglePause;
$("reset").onclick = () => reset("");
$("newscene").onclick = () => reset(JSON.stringify({scene: "new"}));
$("save").onclick = async () => {
  $("saved").textContent = "saving...";
  try {
    const [r, j] = await post("/save", "");
    $("saved").textContent = r.ok ? "saved " + j.frames + " frames: " + j.files.join(", ") + ". Replay: " + j.replay
                                  : j.error;
  } catch (e) { $("saved").textContent = "no answer from the server"; }
};
addEventListener("load", () => {
  $("view").src = "/stream?format=png";   // after load: a stream never finishes loading
  drawMap(); loop(); loop(); poll();
});
</script>
</body></html>
"""


def serve(cfg):
    """Load the model, warm it up, listen; returns when the server is stopped (Ctrl-C or SIGTERM)."""
    if not 0 <= cfg.port <= 65535:
        common.die(f"--port must be in 0..65535, got {cfg.port}")
    _, _, _, device = common.setup_ddp(cfg.device or None)
    net, codec, ckpt = infer.load_model(cfg, device)
    # one throwaway chunk: the first real key then does not pay for the first call's allocations
    warm = infer.open_stream(cfg, net, codec, infer.load_path(cfg, "x"))
    warm.step(infer.walker(cfg).cameras(["x"] * (net.cfg.chunk - 1), cfg.width, cfg.height))
    try:
        server = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    except OSError as e:
        common.die(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}")
    game = Handler.game = Game(cfg, net, codec, ckpt)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a kill still cleans the recording up
    host, port = server.server_address[:2]
    print(f"minWM play: http://{host}:{port}/  ({os.path.basename(ckpt)}, scene {cfg.scene_seed}; Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        game.close()


if __name__ == "__main__":
    serve(common.parse_config(Config))
