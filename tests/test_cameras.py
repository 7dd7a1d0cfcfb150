"""cameras.py: camera files, action strings, the scale policy, mirrored paths, the path picture."""
import json
import math

import numpy as np
import pytest
import torch

import cameras
import world

from helpers import assert_rigid, pose, R_Y90



def test_actions_hand_computed():
    cams = cameras.load_cameras("w*2,j*1", trans_step=0.5, rot_step=90)
    assert cams.w2c.shape == (1, 4, 4, 4) and cams.K.shape == (1, 4, 4)
    expected = [pose(np.eye(3), [0, 0, 0]), pose(np.eye(3), [0, 0, -0.5]), pose(np.eye(3), [0, 0, -1.0]),
                pose(R_Y90, [-1, 0, 0])]  # after a left turn the camera looks along -x; w2c = [Rᵀ, -Rᵀc]
    assert torch.allclose(cams.w2c[0], torch.tensor(np.stack(expected), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(cams.K[0], torch.tensor([0.8, 0.8, 0.5, 0.5]).expand(4, 4))
    # single letters: camera-to-world of frame 1
    c2w = lambda s: cameras.rigid_inverse(cameras.load_cameras(s, trans_step=0.5, rot_step=90).w2c[0, 1])
    assert torch.allclose(c2w("l")[:3, 2], torch.tensor([1.0, 0, 0]), atol=1e-6)  # yaw right: +z -> +x
    assert torch.allclose(c2w("d")[:3, 3], torch.tensor([0.5, 0, 0]))
    assert torch.allclose(c2w("u")[:3, 3], torch.tensor([0, -0.5, 0]))  # up is -y
    assert torch.allclose(c2w("n")[:3, 3], torch.tensor([0, 0.5, 0]))
    assert torch.allclose(c2w("i")[:3, 2], torch.tensor([0, -1.0, 0]), atol=1e-6)  # pitch up: +z -> -y
    assert torch.equal(c2w("x"), torch.eye(4))
    # 'wl' = forward then yaw in one step; non-square frames keep square pixels
    cams = cameras.load_cameras("wl*2", trans_step=1, rot_step=90, width=832, height=480)
    assert torch.allclose(cameras.rigid_inverse(cams.w2c[0, 2])[:3, 3], torch.tensor([1.0, 0, 1]), atol=1e-6)
    assert torch.allclose(cams.K[0, 0], torch.tensor([0.8, 0.8 * 832 / 480, 0.5, 0.5]))


def test_actions_pitch0_keeps_horizon_level():
    # frame 0 looks 20° down: "w" moves horizontally, which is forward and up (-y) in frame 0's axes
    c2w = cameras.rigid_inverse(cameras.load_cameras("w", trans_step=0.5, pitch0=20).w2c[0, 1])
    s, c = math.sin(math.radians(20)), math.cos(math.radians(20))
    assert torch.allclose(c2w[:3, 3], torch.tensor([0, -0.5 * s, 0.5 * c]), atol=1e-6)
    # in the procedural world (start pitched START_PITCH down) turns never roll: camera x stays horizontal
    cams = cameras.load_cameras("l*3,i*2,j*4,wd*2", rot_step=10, pitch0=world.START_PITCH)
    in_world = cams.w2c[0].double() @ torch.tensor(world.start_w2c())
    assert in_world[:, 0, 1].abs().max() < 1e-6  # y component of the camera's x axis
    assert_rigid(cams.w2c[0])


def test_json_v1_roundtrip(tmp_path):
    cams = cameras.load_cameras("w*3,l*2,dk,s", trans_step=0.3, rot_step=7, width=832, height=480)
    cameras.save_cameras(tmp_path / "traj.json", cams, width=832, height=480, fps=16)
    doc = json.loads((tmp_path / "traj.json").read_text())
    assert (doc["convention"], doc["pose"], doc["width"], doc["height"], doc["fps"]) == ("opencv", "w2c", 832, 480, 16)
    assert len(doc["frames"]) == 8 and not list(tmp_path.glob("*.tmp*"))
    back = cameras.load_cameras(str(tmp_path / "traj.json"))
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
    a, b = cameras.load_cameras(tmp_path / "w.json"), cameras.load_cameras(tmp_path / "c.json")
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
    metric = cameras.load_cameras(tmp_path / "pose.json", scale="metric")
    assert torch.allclose(metric.w2c[0, 1], torch.tensor(pose(R_Y90.T, [2, 0, 0]), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(metric.K[0], torch.tensor([400 / 640, 400 / 480, 0.5, 0.5]).expand(2, 4))  # W = 2cx, H = 2cy
    default = cameras.load_cameras(tmp_path / "pose.json")  # per_clip: the farthest camera is 1 away
    assert torch.allclose(default.w2c[0, 1, :3, 3], torch.tensor([1.0, 0, 0]), atol=1e-6)
    sized = cameras.load_cameras(tmp_path / "pose.json", width=800, height=600)  # the size we generate at
    assert torch.equal(sized.K, metric.K)  # does not change K, which is in the file's own pixels


def test_realestate10k_file(tmp_path):
    rows = lambda T: " ".join(f"{v:g}" for v in T[:3].reshape(-1))
    w2c0, w2c1 = pose(np.eye(3), [0, 0, 1]), pose(R_Y90, [0, 0, 4])
    text = "https://www.youtube.com/watch?v=abc\n" + "\n".join(
        f"{t} 0.5 0.9 0.5 0.5 0 0 {rows(T)}" for t, T in ((33366, w2c0), (66733, w2c1))) + "\n"
    (tmp_path / "cams.txt").write_text(text)
    # w2c_1 · w2c_0⁻¹ = [R_Y90, R_Y90 (0, 0, -1) + (0, 0, 4)] = [R_Y90, (-1, 0, 4)]
    metric = cameras.load_cameras(str(tmp_path / "cams.txt"), scale="metric")
    assert torch.allclose(metric.w2c[0, 1], torch.tensor(pose(R_Y90, [-1, 0, 4]), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(metric.K[0], torch.tensor([0.5, 0.9, 0.5, 0.5]).expand(2, 4))  # already normalized
    per_clip = cameras.load_cameras(str(tmp_path / "cams.txt"))
    assert torch.allclose(per_clip.w2c[0, 1, :3, 3], torch.tensor([-1.0, 0, 4]) / math.sqrt(17), atol=1e-6)


def test_normalize_scale_and_mirror():
    cams = cameras.load_cameras("w*4", trans_step=0.5)
    assert cameras.normalize_scale(cams, "metric") is cams
    per_clip = cameras.normalize_scale(cams, "per_clip")
    assert torch.allclose(per_clip.w2c[0, -1, :3, 3], torch.tensor([0, 0, -1.0]))
    assert torch.allclose(per_clip.w2c[0, 2, :3, 3], torch.tensor([0, 0, -0.5]))
    still = cameras.load_cameras("x*3")
    assert torch.equal(cameras.normalize_scale(still, "per_clip").w2c, still.w2c)
    with pytest.raises(ValueError, match="scale"):
        cameras.normalize_scale(cams, "global")
    # the mirror turns left turns into right turns and left strafes into right ones
    mirrored = cameras.mirror_cameras(cameras.load_cameras("l*3,a*2,wj", rot_step=8))
    assert torch.allclose(mirrored.w2c, cameras.load_cameras("j*3,d*2,wl", rot_step=8).w2c, atol=1e-6)
    assert_rigid(mirrored.w2c)
    straight = cameras.load_cameras("w*3,u")
    assert torch.equal(cameras.mirror_cameras(straight).w2c, straight.w2c)


def test_string_or_path(tmp_path):
    assert cameras.load_cameras("w*2").num_frames == 3
    cameras.save_cameras(tmp_path / "noext", cameras.load_cameras("d*4"))
    assert cameras.load_cameras(str(tmp_path / "noext")).num_frames == 5  # an existing file is a file


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
        cameras.load_cameras(src)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_plot_trajectory(tmp_path):
    from PIL import Image
    cameras.plot_trajectory(cameras.load_cameras("w*4,l*6,w*4,dj*3"), tmp_path / "traj.png", title="w*4,l*6,w*4,dj*3")
    img = np.asarray(Image.open(tmp_path / "traj.png").convert("RGB")).astype(int)
    assert img.shape == (384, 384, 3)
    coloured = (np.abs(img - img.mean(-1, keepdims=True)).max(-1) > 60).sum()  # blue/red arrows and dots
    assert coloured > 200
    cameras.plot_trajectory(cameras.load_cameras("x*3"), tmp_path / "still.png")  # a camera that does not move
