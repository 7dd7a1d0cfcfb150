"""data.py: camera files and action strings, the procedural world, the dataset, codecs, the real-data cache."""
import json
import math
import os
import subprocess
import sys
import time

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import data
from prope import Cameras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_rigid(w2c, atol=1e-5):
    R = w2c[..., :3, :3]
    eye = torch.eye(3).expand_as(R)
    assert torch.allclose(R.mT @ R, eye, atol=atol)
    assert torch.allclose(torch.linalg.det(R), torch.ones(R.shape[:-2]), atol=atol)
    assert torch.equal(w2c[..., 3, :], torch.tensor([0.0, 0, 0, 1]).expand_as(w2c[..., 3, :]))


def pose(R, t):
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


R_Y90 = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # yaw right by 90°: +z turns to +x


# ---------------------------------------------------------------------------------------------
# cameras: formats, actions, scale, mirror

def test_actions_hand_computed():
    cams = data.load_cameras("w*2,j*1", trans_step=0.5, rot_step=90)
    assert cams.w2c.shape == (1, 4, 4, 4) and cams.K.shape == (1, 4, 4)
    expected = [pose(np.eye(3), [0, 0, 0]), pose(np.eye(3), [0, 0, -0.5]), pose(np.eye(3), [0, 0, -1.0]),
                pose(R_Y90, [-1, 0, 0])]  # after a left turn the camera looks along -x; w2c = [Rᵀ, -Rᵀc]
    assert torch.allclose(cams.w2c[0], torch.tensor(np.stack(expected), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(cams.K[0], torch.tensor([0.8, 0.8, 0.5, 0.5]).expand(4, 4))
    # single letters: camera-to-world of frame 1
    c2w = lambda s: data.rigid_inverse(data.load_cameras(s, trans_step=0.5, rot_step=90).w2c[0, 1])
    assert torch.allclose(c2w("l")[:3, 2], torch.tensor([1.0, 0, 0]), atol=1e-6)  # yaw right: +z -> +x
    assert torch.allclose(c2w("d")[:3, 3], torch.tensor([0.5, 0, 0]))
    assert torch.allclose(c2w("u")[:3, 3], torch.tensor([0, -0.5, 0]))  # up is -y
    assert torch.allclose(c2w("n")[:3, 3], torch.tensor([0, 0.5, 0]))
    assert torch.allclose(c2w("i")[:3, 2], torch.tensor([0, -1.0, 0]), atol=1e-6)  # pitch up: +z -> -y
    assert torch.equal(c2w("x"), torch.eye(4))
    # 'wl' = forward then yaw in one step; non-square frames keep square pixels
    cams = data.load_cameras("wl*2", trans_step=1, rot_step=90, width=832, height=480)
    assert torch.allclose(data.rigid_inverse(cams.w2c[0, 2])[:3, 3], torch.tensor([1.0, 0, 1]), atol=1e-6)
    assert torch.allclose(cams.K[0, 0], torch.tensor([0.8, 0.8 * 832 / 480, 0.5, 0.5]))


def test_actions_pitch0_keeps_horizon_level():
    # frame 0 looks 20° down: "w" moves horizontally, which is forward and up (-y) in frame 0's axes
    c2w = data.rigid_inverse(data.load_cameras("w", trans_step=0.5, pitch0=20).w2c[0, 1])
    s, c = math.sin(math.radians(20)), math.cos(math.radians(20))
    assert torch.allclose(c2w[:3, 3], torch.tensor([0, -0.5 * s, 0.5 * c]), atol=1e-6)
    # in the procedural world (start pitched START_PITCH down) turns never roll: camera x stays horizontal
    cams = data.load_cameras("l*3,i*2,j*4,wd*2", rot_step=10, pitch0=data.START_PITCH)
    world = cams.w2c[0].double() @ torch.tensor(data.start_w2c())
    assert world[:, 0, 1].abs().max() < 1e-6  # y component of the camera's x axis
    assert_rigid(cams.w2c[0])


def test_json_v1_roundtrip(tmp_path):
    cams = data.load_cameras("w*3,l*2,dk,s", trans_step=0.3, rot_step=7, width=832, height=480)
    data.save_cameras(tmp_path / "traj.json", cams, width=832, height=480, fps=16)
    doc = json.loads((tmp_path / "traj.json").read_text())
    assert (doc["convention"], doc["pose"], doc["width"], doc["height"], doc["fps"]) == ("opencv", "w2c", 832, 480, 16)
    assert len(doc["frames"]) == 8 and not list(tmp_path.glob("*.tmp*"))
    back = data.load_cameras(str(tmp_path / "traj.json"))
    assert torch.equal(back.w2c, cams.w2c) and torch.equal(back.K, cams.K)


def test_c2w_and_w2c_files_agree(tmp_path):
    rng = np.random.default_rng(0)
    w2c = []
    for _ in range(5):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        w2c.append(pose(q * np.sign(np.linalg.det(q)), rng.normal(size=3)))
    K_norm = [0.6, 0.9, 0.52, 0.48]
    K_pix = [[0.6 * 640, 0, 0.52 * 640], [0, 0.9 * 360, 0.48 * 360], [0, 0, 1]]
    head = {"convention": "opencv", "width": 640, "height": 360}
    w_frames = [{"K_norm": K_norm, "w2c": T.tolist()} for T in w2c]
    c_frames = [{"K": K_pix, "c2w": np.linalg.inv(T).tolist()} for T in w2c]
    (tmp_path / "w.json").write_text(json.dumps({**head, "pose": "w2c", "frames": w_frames}))
    (tmp_path / "c.json").write_text(json.dumps({**head, "pose": "c2w", "frames": c_frames}))
    a, b = data.load_cameras(tmp_path / "w.json"), data.load_cameras(tmp_path / "c.json")
    assert torch.allclose(a.w2c, b.w2c, atol=1e-5) and torch.allclose(a.K, b.K, atol=1e-6)
    assert torch.equal(a.w2c[0, 0], torch.eye(4))
    rel = torch.tensor(w2c[3] @ np.linalg.inv(w2c[0]), dtype=torch.float32)  # w2c_f · w2c_0⁻¹
    assert torch.allclose(a.w2c[0, 3], rel, atol=1e-5)
    assert_rigid(a.w2c)


def test_worldplay_file(tmp_path):
    K = [[400, 0, 320], [0, 400, 240], [0, 0, 1]]
    doc = {"0": {"extrinsic": pose(np.eye(3), [1, 0, 0]).tolist(), "K": K},
           "1": {"extrinsic": pose(R_Y90, [1, 0, 2]).tolist(), "K": K}}
    (tmp_path / "pose.json").write_text(json.dumps(doc))
    # relative w2c_1 = inv(c2w_1) · c2w_0 = [R_Y90ᵀ, -R_Y90ᵀ (0, 0, 2)] = [R_Y90ᵀ, (2, 0, 0)]
    metric = data.load_cameras(tmp_path / "pose.json", scale="metric")
    assert torch.allclose(metric.w2c[0, 1], torch.tensor(pose(R_Y90.T, [2, 0, 0]), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(metric.K[0], torch.tensor([400 / 640, 400 / 480, 0.5, 0.5]).expand(2, 4))  # W = 2cx, H = 2cy
    default = data.load_cameras(tmp_path / "pose.json")  # per_clip: the farthest camera is 1 away
    assert torch.allclose(default.w2c[0, 1, :3, 3], torch.tensor([1.0, 0, 0]), atol=1e-6)
    sized = data.load_cameras(tmp_path / "pose.json", width=800, height=600)
    assert torch.allclose(sized.K[0, 0], torch.tensor([0.5, 400 / 600, 0.4, 0.4]))


def test_realestate10k_file(tmp_path):
    rows = lambda T: " ".join(f"{v:g}" for v in T[:3].reshape(-1))
    w2c0, w2c1 = pose(np.eye(3), [0, 0, 1]), pose(R_Y90, [0, 0, 4])
    text = "https://www.youtube.com/watch?v=abc\n" + "\n".join(
        f"{t} 0.5 0.9 0.5 0.5 0 0 {rows(T)}" for t, T in ((33366, w2c0), (66733, w2c1))) + "\n"
    (tmp_path / "cams.txt").write_text(text)
    # w2c_1 · w2c_0⁻¹ = [R_Y90, R_Y90 (0, 0, -1) + (0, 0, 4)] = [R_Y90, (-1, 0, 4)]
    metric = data.load_cameras(str(tmp_path / "cams.txt"), scale="metric")
    assert torch.allclose(metric.w2c[0, 1], torch.tensor(pose(R_Y90, [-1, 0, 4]), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(metric.K[0], torch.tensor([0.5, 0.9, 0.5, 0.5]).expand(2, 4))  # already normalized
    per_clip = data.load_cameras(str(tmp_path / "cams.txt"))
    assert torch.allclose(per_clip.w2c[0, 1, :3, 3], torch.tensor([-1.0, 0, 4]) / math.sqrt(17), atol=1e-6)


def test_normalize_scale_and_mirror():
    cams = data.load_cameras("w*4", trans_step=0.5)
    assert data.normalize_scale(cams, "metric") is cams
    per_clip = data.normalize_scale(cams, "per_clip")
    assert torch.allclose(per_clip.w2c[0, -1, :3, 3], torch.tensor([0, 0, -1.0]))
    assert torch.allclose(per_clip.w2c[0, 2, :3, 3], torch.tensor([0, 0, -0.5]))
    still = data.load_cameras("x*3")
    assert torch.equal(data.normalize_scale(still, "per_clip").w2c, still.w2c)
    with pytest.raises(ValueError, match="scale"):
        data.normalize_scale(cams, "global")
    # the mirror turns left turns into right turns and left strafes into right ones
    mirrored = data.mirror_cameras(data.load_cameras("l*3,a*2,wj", rot_step=8))
    assert torch.allclose(mirrored.w2c, data.load_cameras("j*3,d*2,wl", rot_step=8).w2c, atol=1e-6)
    assert_rigid(mirrored.w2c)
    straight = data.load_cameras("w*3,u")
    assert torch.equal(data.mirror_cameras(straight).w2c, straight.w2c)


def test_string_or_path(tmp_path):
    assert data.load_cameras("w*2").num_frames == 3
    data.save_cameras(tmp_path / "noext", data.load_cameras("d*4"))
    assert data.load_cameras(str(tmp_path / "noext")).num_frames == 5  # an existing file is a file


def v1(**change):
    """A valid 4-frame JSON v1 document with top-level fields changed."""
    frames = [{"K_norm": [0.8, 0.8, 0.5, 0.5], "w2c": np.eye(4).tolist()} for _ in range(4)]
    return json.dumps({"convention": "opencv", "pose": "w2c", "width": 64, "height": 64, "fps": 8, "frames": frames,
                       **change})


def frame_change(i, field, value):
    """The valid document with frames[i][field] set to value (None: removed)."""
    doc = json.loads(v1())
    if value is None:
        doc["frames"][i].pop(field)
    else:
        doc["frames"][i][field] = value
    return json.dumps(doc)


EYE = np.eye(4).tolist()
KPIX = [[400, 0, 320], [0, 400, 240], [0, 0, 1]]
SCALED = (np.diag([1.4, 1, 1, 1])).tolist()
RE_OK = "0 0.5 0.9 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0"
NAN_POSE = [[1, 0, 0, float("nan")], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
STR_POSE = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, "1", 0], [0, 0, 0, 1]]
BAD_ROW = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]

MALFORMED = [  # (file name or None for an action string, content, substrings the message must contain)
    ("traj.json", "", ["traj.json", "empty"]),
    ("traj.json", "{\"frames\": [", ["traj.json", "invalid JSON"]),
    ("traj.json", "[1, 2]", ["traj.json", "top level"]),
    ("traj.json", json.dumps({"convention": "opencv", "pose": "w2c"}), ["traj.json", "frames", "missing"]),
    ("traj.json", v1(frames=[]), ["traj.json", "frames", "non-empty"]),
    ("traj.json", frame_change(1, "w2c", NAN_POSE), ["traj.json: frames[1].w2c", "finite"]),
    ("traj.json", frame_change(2, "w2c", STR_POSE), ["frames[2].w2c", "numbers"]),
    ("traj.json", frame_change(1, "w2c", np.eye(3).tolist()), ["frames[1].w2c", "4x4", "(3, 3)"]),
    ("traj.json", frame_change(3, "w2c", SCALED), ["frames[3].w2c", "not orthonormal", "0.96"]),
    ("traj.json", frame_change(1, "w2c", np.diag([-1.0, 1, 1, 1]).tolist()), ["frames[1].w2c", "det -1"]),
    ("traj.json", frame_change(2, "w2c", BAD_ROW), ["frames[2].w2c", "last row"]),
    ("traj.json", frame_change(1, "K_norm", [0, 0.8, 0.5, 0.5]), ["frames[1].K_norm", "focal length", "fx=0"]),
    ("traj.json", frame_change(0, "K_norm", [0.8, -0.8, 0.5, 0.5]), ["frames[0].K_norm", "focal length"]),
    ("traj.json", frame_change(2, "K_norm", [0.8, 0.8, 0.5]), ["frames[2].K_norm", "expected 4 numbers"]),
    ("traj.json", frame_change(1, "K_norm", None), ["frames[1].K_norm", "missing"]),
    ("traj.json", v1(convention="opengl"), ["convention", "opengl"]),
    ("traj.json", v1(pose="cam2world"), ["pose", "cam2world"]),
    ("traj.json", v1(pose="c2w"), ["frames[0].c2w", "missing"]),
    ("traj.json", json.dumps({"convention": "opencv", "pose": "w2c", "frames": [{"K": KPIX, "w2c": EYE}]}),
     ["frames[0].K", "width and height"]),
    ("traj.json", v1(frames=[{"K_norm": [0.8, 0.8, 0.5, 0.5], "w2c": EYE}, "oops"]), ["frames[1]", "object"]),
    (None, "w*2,q", ['token 1 "q" (frame 3)', "unknown action letter 'q'"]),
    (None, "w*0", ['token 0 "w*0" (frame 1)', "repeat count", "'0'"]),
    (None, "d,w*x", ['token 1 "w*x" (frame 2)', "repeat count", "'x'"]),
    (None, "w*", ['token 0 "w*"', "repeat count"]),
    (None, "w,,d", ['token 1 "" (frame 2)', "no action letter"]),
    (None, "", ["empty action string"]),
    ("pose.json", json.dumps({"0": {"extrinsic": EYE, "K": KPIX}, "1": {"K": KPIX}}),
     ['pose.json: ["1"].extrinsic', "missing"]),
    ("pose.json", json.dumps({"0": {"extrinsic": EYE, "K": KPIX}, "2": {"extrinsic": EYE, "K": KPIX}}),
     ['["1"]', "consecutive"]),
    ("pose.json", json.dumps({"0": {"extrinsic": NAN_POSE, "K": KPIX}}), ['["0"].extrinsic', "finite"]),
    ("pose.json", json.dumps({"0": {"extrinsic": EYE, "K": [[0, 0, 320], [0, 400, 240], [0, 0, 1]]}}),
     ['["0"].K', "focal length"]),
    ("cams.txt", "https://youtu.be/x\n" + RE_OK + "\n" + RE_OK[:-2] + "\n",
     ["cams.txt: line 3 (frame 1)", "expected 19 fields", "got 18"]),
    ("cams.txt", "https://youtu.be/x\n" + RE_OK.replace("0.9", "abc") + "\n", ["line 2 (frame 0)", "numbers"]),
    ("cams.txt", "https://youtu.be/x\n" + RE_OK.replace("0 0 1 0 0 0 0 1 0", "0 0 2 0 0 0 0 1 0") + "\n",
     ["line 2 (frame 0) w2c", "orthonormal"]),
    ("cams.txt", "https://youtu.be/x\n", ["cams.txt", "no camera lines"]),
    ("missing.json", None, ["missing.json", "not found"]),
]


@pytest.mark.parametrize("name,content,expected", MALFORMED, ids=[f"{i}" for i in range(len(MALFORMED))])
def test_malformed_inputs(tmp_path, name, content, expected):
    if name is None:
        src = content
    else:
        src = str(tmp_path / name)
        if content is not None:
            (tmp_path / name).write_text(content)
    with pytest.raises(ValueError) as err:
        data.load_cameras(src)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


# ---------------------------------------------------------------------------------------------
# the procedural world

def test_render_deterministic_and_same_pose_same_frame():
    cams = data.load_cameras("x*3")
    video = data.render_world(7, cams, 24, 24)
    assert video.shape == (3, 4, 24, 24) and video.min() >= -1 and video.max() <= 1
    assert all(torch.equal(video[:, 0], video[:, f]) for f in range(1, 4))
    assert torch.equal(video, data.render_world(7, cams, 24, 24))
    assert not torch.equal(video, data.render_world(8, cams, 24, 24))
    batched = Cameras(cams.w2c.expand(2, -1, -1, -1), cams.K.expand(2, -1, -1))  # the first path is used
    assert torch.equal(video, data.render_world(7, batched, 24, 24))


def test_forward_enlarges_centre_object():
    cams = data.load_cameras("w", trans_step=1.5, pitch0=data.START_PITCH)
    for seed in range(4):
        _, labels = data.render_world(seed, cams, 32, 32, return_labels=True)
        before, after = (labels[0] == 2).sum().item(), (labels[1] == 2).sum().item()  # object 0: straight ahead
        assert before >= 6 and after > 1.4 * before, (seed, before, after)


def test_pinhole_intrinsics_and_resolution():
    cams = data.load_cameras("x")
    for seed in range(3):
        obj = data.make_scene(seed)["objects"][0]
        x, y, z = (data.start_w2c() @ np.append(obj["centre"], 1))[:3]  # object 0's centre in the start camera
        area = lambda K, size: (data.render_world(seed, Cameras(cams.w2c, K), size, size,
                                                  return_labels=True)[1][0] == 2).sum().item()
        for fx, fy, cx, cy in ([0.8, 0.8, 0.5, 0.5], [1.2, 0.9, 0.4, 0.6], [0.6, 0.7, 0.55, 0.35]):
            u, v = fx * x / z + cx, fy * y / z + cy  # where the pinhole model puts the centre
            K = torch.tensor([[fx, fy, cx, cy]] * 2)[None]
            _, labels = data.render_world(seed, Cameras(cams.w2c, K), 32, 32, return_labels=True)
            assert labels[0, int(v * 32), int(u * 32)] == 2
        # zooming 2x about the object's image position quadruples its area; so does doubling the resolution
        K = torch.tensor([[0.8, 0.8, 0.5, 0.5]] * 2)[None]
        u, v = 0.8 * x / z + 0.5, 0.8 * y / z + 0.5
        zoom = torch.tensor([[1.6, 1.6, u - 2 * (u - 0.5), v - 2 * (v - 0.5)]] * 2)[None]
        small, big, zoomed = area(K, 32), area(K, 64), area(zoom, 32)
        assert 3.3 < big / small < 4.7 and 3.3 < zoomed / small < 4.7, (seed, small, big, zoomed)


def horizontal_shift(a, b, max_shift=10):
    """The k that best explains b(x) = a(x + k): k > 0 when content moved left."""
    a, b = a.mean(0), b.mean(0)  # grey (H, W)
    W = a.shape[-1]
    err = {k: ((b[:, max(0, -k):W - max(0, k)] - a[:, max(0, k):W - max(0, -k)]) ** 2).mean().item()
           for k in range(-max_shift, max_shift + 1)}
    return min(err, key=err.get)


def test_yaw_right_moves_content_left():
    for seed in (0, 3):
        right = data.render_world(seed, data.load_cameras("l", rot_step=6, pitch0=data.START_PITCH), 64, 64)
        left = data.render_world(seed, data.load_cameras("j", rot_step=6, pitch0=data.START_PITCH), 64, 64)
        # 6° of a 64° field of view ≈ 0.8 · 64 · tan 6° ≈ 5 pixels
        assert 3 <= horizontal_shift(right[:, 0], right[:, 1]) <= 7
        assert -7 <= horizontal_shift(left[:, 0], left[:, 1]) <= -3
    strafe = data.render_world(0, data.load_cameras("a", trans_step=0.5, pitch0=data.START_PITCH), 64, 64)
    assert horizontal_shift(strafe[:, 0], strafe[:, 1]) < 0  # stepping left moves content right


def test_start_view_is_ground_dominated():
    start = data.load_cameras("x")
    shares = []
    for seed in range(10):
        _, labels = data.render_world(seed, start, 32, 32, return_labels=True)
        shares.append((labels[0] == data.GROUND).float().mean().item())
    print(f"ground share of the start view: mean {np.mean(shares):.2f}, min {min(shares):.2f}")
    assert min(shares) >= 0.6 and np.mean(shares) <= 0.85


def test_data_bench_runs():  # speed itself is measured by `python data.py bench` / bench.py, not asserted
    out = subprocess.run([sys.executable, "data.py", "bench", "--size", "16", "--frames", "4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "frames/s" in out.stdout, out.stderr


def test_sample_trajectory_mix():
    g = torch.Generator().manual_seed(0)
    kinds, speeds = {"still": 0, "stop": 0, "move": 0}, set()
    for _ in range(300):
        actions, cams = data.sample_trajectory(g, 8)
        assert cams.num_frames == 8 and len(data.parse_actions(actions)) == 7
        kinds["still" if actions == "x*7" else "stop" if "x" in actions else "move"] += 1
        centres = -(cams.w2c[0, :, :3, :3].mT @ cams.w2c[0, :, :3, 3:])[..., 0]
        speeds.add(round(centres[1].norm().item() + cams.w2c[0, 1].trace().item(), 4))  # step size of frame 1
        world = cams.w2c[0].double() @ torch.tensor(data.start_w2c())
        height = (world[:, :3, :3].mT @ world[:, :3, 3:])[:, 1, 0]  # -y of the camera centre = +(Rᵀt)_y
        assert height.min() >= 0.3
    print("trajectory kinds of 300:", kinds)
    assert 20 <= kinds["still"] <= 60 and 20 <= kinds["stop"] <= 60
    assert len(speeds) > 100  # step sizes vary per clip


def test_captions_and_text_embedding():
    scene = data.make_scene(5)
    text = data.caption(5)
    assert text.endswith("checkered ground") and scene["ground"][0] in text
    for obj in scene["objects"]:
        assert f"{obj['colour']} {obj['kind']}" in text
    emb = data.text_embedding(text, 16, 48)
    words = len(text.replace(",", "").split())
    assert emb.shape == (48, 16) and emb[words:].abs().sum() == 0 and (emb[:words].abs().sum(-1) > 0).all()
    assert torch.equal(emb, data.text_embedding(text, 16, 48))
    other = data.text_embedding("a red sphere", 16, 48)
    assert torch.equal(other[0], data.text_embedding("a blue box", 16, 48)[0])  # same word, same place
    assert not torch.equal(other[1], data.text_embedding("a blue box", 16, 48)[1])
    assert data.text_embedding(text, 16, 4).shape == (4, 16)  # truncated


def check_clip(clip, frames, size, text_len=32, text_dim=32):
    assert clip["video"].shape == (3, frames, size, size)
    assert clip["video"].min() >= -1 and clip["video"].max() <= 1
    assert clip["w2c"].shape == (frames, 4, 4) and clip["K"].shape == (frames, 4)
    assert torch.equal(clip["w2c"][0], torch.eye(4))
    assert_rigid(clip["w2c"])
    assert clip["text"].shape == (text_len, text_dim) and isinstance(clip["caption"], str)
    assert 0 <= clip["scene_seed"] < data.EVAL_SEED_BASE
    assert data.load_cameras(clip["actions"]).num_frames == frames


def test_dataset_ranks_seeds_and_resume():
    take = lambda ds, n: [clip for clip, _ in zip(iter(ds), range(n))]
    rank0 = take(data.ProceduralWorld(4, 16, 16, seed=0, rank=0, world_size=2), 3)
    rank1 = take(data.ProceduralWorld(4, 16, 16, seed=0, rank=1, world_size=2), 3)
    again = take(data.ProceduralWorld(4, 16, 16, seed=0, rank=0, world_size=2), 3)
    other = take(data.ProceduralWorld(4, 16, 16, seed=1, rank=0, world_size=2), 3)
    for clip in rank0 + rank1:
        check_clip(clip, 4, 16)
    seeds0, seeds1 = {c["scene_seed"] for c in rank0}, {c["scene_seed"] for c in rank1}
    assert len(seeds0) == 3 and not seeds0 & seeds1
    assert all(not torch.equal(a["video"], b["video"]) for a, b in zip(rank0, rank1))
    assert all(torch.equal(a["video"], b["video"]) and a["actions"] == b["actions"] for a, b in zip(rank0, again))
    assert not seeds0 & {c["scene_seed"] for c in other}
    # make_batch(step) == the stream resumed at start = step·batch_size, also through DataLoader workers
    batch = data.make_batch(0, 1, 2, 4, 16, 16, rank=1, world_size=2)
    assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["text"].shape == (2, 32, 32)
    assert torch.equal(batch["video"][0], take(data.ProceduralWorld(4, 16, 16, 0, 1, 2, start=2), 1)[0]["video"])
    world = data.ProceduralWorld(4, 16, 16, 0, 1, 2, batch_size=2)  # each worker makes whole batches
    loader = torch.utils.data.DataLoader(world, batch_size=2, num_workers=2)
    batches = [b for b, _ in zip(loader, range(2))]
    assert torch.equal(batches[1]["video"], batch["video"]) and batches[1]["actions"] == batch["actions"]
    assert torch.equal(batches[0]["video"][1], rank1[1]["video"])


def test_eval_set_held_out_and_fixed():
    held = data.eval_set(3, 5, 16, 16)
    assert [s for s, *_ in held] == [data.EVAL_SEED_BASE + i for i in range(3)]
    for seed, actions, cams, video in held:
        assert video.shape == (3, 5, 16, 16) and cams.num_frames == 5
        assert "x" not in actions  # moving paths only
        assert (data.mirror_cameras(cams).w2c - cams.w2c).abs().max() > 0.1
    again = data.eval_set(3, 5, 16, 16)
    assert all(torch.equal(a[3], b[3]) and a[1] == b[1] for a, b in zip(held, again))
    assert data.eval_set(1, 5, 16, 16, seed=1)[0][0] == data.EVAL_SEED_BASE + 100_000
    train = data.make_batch(0, 0, 24, 2, 4, 4)["scene_seed"]
    assert (train < data.EVAL_SEED_BASE).all()


def test_plot_trajectory(tmp_path):
    from PIL import Image
    data.plot_trajectory(data.load_cameras("w*4,l*6,w*4,dj*3"), tmp_path / "traj.png", title="w*4,l*6,w*4,dj*3")
    img = np.asarray(Image.open(tmp_path / "traj.png").convert("RGB")).astype(int)
    assert img.shape == (384, 384, 3)
    coloured = (np.abs(img - img.mean(-1, keepdims=True)).max(-1) > 60).sum()  # blue/red arrows and dots
    assert coloured > 200
    data.plot_trajectory(data.load_cameras("x*3"), tmp_path / "still.png")  # a camera that does not move


# ---------------------------------------------------------------------------------------------
# codecs

def test_pixel_codec_exact():
    video = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    for factor in (1, 2, 4):
        codec = data.PixelCodec(factor)
        latents = codec.encode(video)
        assert latents.shape == (2, 3 * factor**2, 5, 16 // factor, 24 // factor)
        assert (codec.channels, codec.spatial, codec.temporal) == (3 * factor**2, factor, 1)
        assert torch.equal(codec.decode(latents), video)
    assert torch.equal(data.PixelCodec(2).encode(video)[0, :4, 0, 0, 0], video[0, 0, 0, :2, :2].reshape(-1))


def tiny_vae(**kw):
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    return AutoencoderKLWan(**{"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, **kw}).eval()


def test_wan_vae_codec():
    mean, std = [0.1, -0.2, 0.3, 0.4], [1.5, 2.0, 0.5, 3.0]
    vae = tiny_vae(latents_mean=mean, latents_std=std)
    codec = data.WanVAECodec(vae)
    assert (codec.channels, codec.spatial, codec.temporal) == (4, 8, 4)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (1, 4, 3, 2, 2)  # 4k + 1 = 9 frames -> k + 1 = 3 latent frames
    with torch.no_grad():
        mu = vae.encode(video).latent_dist.mode()
        manual = (mu - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
        decoded = vae.decode(z * torch.tensor(std).view(1, 4, 1, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1, 1)).sample
    assert torch.allclose(z, manual, atol=1e-6)
    out = codec.decode(z)
    assert out.shape == (1, 3, 9, 16, 16) and torch.allclose(out, decoded.clamp(-1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="4k\\+1"):
        codec.encode(video[:, :, :8])
    wan = data.WanVAECodec(tiny_vae(z_dim=16, latents_mean=None, latents_std=None))  # no constants in the config
    assert torch.equal(wan.mean.flatten(), torch.tensor(data.WAN_MEAN))
    assert torch.equal(wan.std.flatten(), torch.tensor(data.WAN_STD))
    plain = data.WanVAECodec(tiny_vae())  # z_dim 4 with the config's 16 default constants: no normalization
    assert torch.equal(plain.mean.flatten(), torch.zeros(4)) and torch.equal(plain.std.flatten(), torch.ones(4))


# ---------------------------------------------------------------------------------------------
# real data: prepare -> LatentDataset

def write_video(path, frames=9, h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(h // 8, w // 8, 3)).repeat(8, 0).repeat(8, 1)
    clip = [np.roll(base, 2 * t, axis=1).astype(np.uint8) for t in range(frames)]
    imageio.mimwrite(path, clip, fps=8, macro_block_size=16)


def tiny_text_encoder(path):
    """A 1-layer random T5 encoder and a word-level tokenizer built offline, saved as one folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    words = ["<pad>", "</s>", "<unk>", "a", "red", "sphere", "blue", "box", "on", "green", "ground"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(words), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(path)


def test_prepare_and_latent_dataset(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    tiny_vae().save_pretrained(tmp_path / "vae")
    tiny_text_encoder(tmp_path / "t5")
    write_video(src / "a.mp4", seed=0)  # JSON v1 cameras (one per video frame) + a caption
    data.save_cameras(src / "a.json", data.load_cameras("w*4,l*4", trans_step=0.5, rot_step=5), width=64, height=48)
    (src / "a.caption.txt").write_text("a red sphere on green ground\n")
    write_video(src / "b.mp4", seed=1)  # RealEstate10K cameras + a precomputed embedding
    lines = [f"{t} 0.5 0.6 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 {0.25 * t}" for t in range(9)]
    (src / "b.txt").write_text("https://youtu.be/b\n" + "\n".join(lines) + "\n")
    b_text = torch.randn(5, 8)
    save_file({"text": b_text}, src / "b.text.safetensors")
    write_video(src / "c.mp4", seed=2)  # no cameras: skipped with a message
    kw = dict(vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "t5"), frames=9, height=32, width=32,
              text_len=6, shard_size=1)

    assert data.prepare(src, out, **kw) == ["a", "b"]
    assert "skip c: cameras" in capsys.readouterr().out
    ds = data.LatentDataset(out)
    assert len(ds) == 2
    item = ds[0]
    assert item["latents"].shape == (4, 3, 4, 4) and item["w2c"].shape == (3, 4, 4)
    assert item["K"].shape == (3, 4) and item["text"].shape == (6, 8)
    # bit-identical to what prepare computes, and to a manual encoding
    codec = data.WanVAECodec.load(tmp_path / "vae")
    encode_text = data.load_text_encoder(str(tmp_path / "t5"), 6, 0)
    for i, name in enumerate(["a", "b"]):
        fresh = data._prepare_item(src, name, codec, encode_text, 9, 32, 32, 6, "per_clip")
        assert all(torch.equal(ds[i][key], fresh[key]) for key in ("latents", "w2c", "K", "text"))
    video, (h0, w0, rh, rw, top, left) = data.read_video(src / "a.mp4", 9, 32, 32)
    assert (h0, w0, rh, rw, top, left) == (48, 64, 32, 43, 0, 5)
    assert torch.equal(ds[0]["latents"], codec.encode(video[None])[0])
    assert torch.equal(ds[0]["text"], encode_text("a red sphere on green ground"))
    # cameras: frames 0, 4, 8 of the file, per clip scale, principal point moved by the crop
    full = data.load_cameras(src / "a.json")
    expected = data.normalize_scale(Cameras(full.w2c[:, ::4], full.K[:, ::4]), "per_clip")
    assert torch.allclose(ds[0]["w2c"], expected.w2c[0], atol=1e-6)
    K = torch.tensor([0.8 * 43 / 32, 0.8, (0.5 * 43 - 5) / 32, 0.5])  # resized 48x64 -> 32x43, 5 columns cut
    assert torch.allclose(ds[0]["K"], K.expand(3, 4), atol=1e-6)
    assert torch.allclose(ds[1]["w2c"][:, 2, 3], torch.tensor([0.0, 0.5, 1.0]))  # b moves 2 m: scaled to 1
    assert torch.equal(ds[1]["text"][:5], b_text) and ds[1]["text"][5].abs().sum() == 0  # padded to text_len

    # resume: nothing new to do; then a new item is added and only it is encoded
    shards = sorted(p.name for p in out.glob("shard_*"))
    stamp = (out / shards[0]).stat().st_mtime_ns
    assert data.prepare(src, out, **kw) == []
    data.save_cameras(src / "c.json", data.load_cameras("d*8", trans_step=0.1), width=64, height=48)
    save_file({"text": torch.randn(3, 8)}, src / "c.text.safetensors")
    assert data.prepare(src, out, **kw) == ["c"]
    assert (out / shards[0]).stat().st_mtime_ns == stamp and len(data.LatentDataset(out)) == 3
    # an interruption after the shard but before the index: the item is redone into the same shard name
    index = json.loads((out / "index.json").read_text())
    index["items"], index["shards"] = index["items"][:2], index["shards"][:2]
    (out / "index.json").write_text(json.dumps(index))
    assert data.prepare(src, out, **kw) == ["c"]
    assert sorted(p.name for p in out.glob("*")) == ["index.json"] + [f"shard_{i:05d}.safetensors" for i in range(3)]
    with pytest.raises(ValueError, match="settings"):
        data.prepare(src, out, **{**kw, "frames": 5})
