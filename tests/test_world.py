"""world.py: the procedural world - rendering, scenes and captions, training paths, held-out paths."""

import numpy as np
import torch

import cameras
import world
from prope import Cameras

from helpers import assert_rigid


def test_render_deterministic_and_same_pose_same_frame():
    cams = cameras.load_cameras("x*3")
    video = world.render_world(7, cams, 24, 24)
    assert video.shape == (3, 4, 24, 24) and video.min() >= -1 and video.max() <= 1
    assert all(torch.equal(video[:, 0], video[:, f]) for f in range(1, 4))
    assert torch.equal(video, world.render_world(7, cams, 24, 24))
    assert not torch.equal(video, world.render_world(8, cams, 24, 24))
    batched = Cameras(cams.w2c.expand(2, -1, -1, -1), cams.K.expand(2, -1, -1))  # the first path is used
    assert torch.equal(video, world.render_world(7, batched, 24, 24))


def test_forward_enlarges_centre_object():
    cams = cameras.load_cameras("w", trans_step=1.5, pitch0=world.START_PITCH)
    for seed in range(4):
        _, labels = world.render_world(seed, cams, 32, 32, return_labels=True)
        before, after = (labels[0] == 2).sum().item(), (labels[1] == 2).sum().item()  # object 0: straight ahead
        assert before >= 6 and after > 1.4 * before, (seed, before, after)


def test_pinhole_intrinsics_and_resolution():
    cams = cameras.load_cameras("x")
    for seed in range(3):
        obj = world.make_scene(seed)["objects"][0]
        x, y, z = (world.start_w2c() @ np.append(obj["centre"], 1))[:3]  # object 0's centre in the start camera
        area = lambda K, size: (world.render_world(seed, Cameras(cams.w2c, K), size, size,
                                                  return_labels=True)[1][0] == 2).sum().item()
        for fx, fy, cx, cy in ([0.8, 0.8, 0.5, 0.5], [1.2, 0.9, 0.4, 0.6], [0.6, 0.7, 0.55, 0.35]):
            u, v = fx * x / z + cx, fy * y / z + cy  # where the pinhole model puts the centre
            K = torch.tensor([[fx, fy, cx, cy]] * 2)[None]
            _, labels = world.render_world(seed, Cameras(cams.w2c, K), 32, 32, return_labels=True)
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
        right = world.render_world(seed, cameras.load_cameras("l", rot_step=6, pitch0=world.START_PITCH), 64, 64)
        left = world.render_world(seed, cameras.load_cameras("j", rot_step=6, pitch0=world.START_PITCH), 64, 64)
        # 6° of a 64° field of view ≈ 0.8 · 64 · tan 6° ≈ 5 pixels
        assert 3 <= horizontal_shift(right[:, 0], right[:, 1]) <= 7
        assert -7 <= horizontal_shift(left[:, 0], left[:, 1]) <= -3
    strafe = world.render_world(0, cameras.load_cameras("a", trans_step=0.5, pitch0=world.START_PITCH), 64, 64)
    assert horizontal_shift(strafe[:, 0], strafe[:, 1]) < 0  # stepping left moves content right


def test_start_view_is_ground_dominated():
    start = cameras.load_cameras("x")
    shares = []
    for seed in range(10):
        _, labels = world.render_world(seed, start, 32, 32, return_labels=True)
        shares.append((labels[0] == world.GROUND).float().mean().item())
    print(f"ground share of the start view: mean {np.mean(shares):.2f}, min {min(shares):.2f}")
    assert min(shares) >= 0.6 and np.mean(shares) <= 0.85


def test_sample_trajectory_mix():
    g = torch.Generator().manual_seed(0)
    kinds, speeds = {"still": 0, "stop": 0, "move": 0}, set()
    for _ in range(300):
        actions, cams = world.sample_trajectory(g, 8)
        assert cams.num_frames == 8 and len(cameras.parse_actions(actions)) == 7
        kinds["still" if actions == "x*7" else "stop" if "x" in actions else "move"] += 1
        centres = -(cams.w2c[0, :, :3, :3].mT @ cams.w2c[0, :, :3, 3:])[..., 0]
        speeds.add(round(centres[1].norm().item() + cams.w2c[0, 1].trace().item(), 4))  # step size of frame 1
        in_world = cams.w2c[0].double() @ torch.tensor(world.start_w2c())
        height = (in_world[:, :3, :3].mT @ in_world[:, :3, 3:])[:, 1, 0]  # -y of the camera centre = +(Rᵀt)_y
        assert height.min() >= 0.3
    print("trajectory kinds of 300:", kinds)
    assert 20 <= kinds["still"] <= 60 and 20 <= kinds["stop"] <= 60
    assert len(speeds) > 100  # step sizes vary per clip


def test_captions_and_text_embedding():
    scene = world.make_scene(5)
    text = world.caption(5)
    assert text.endswith("checkered ground") and scene["ground"][0] in text
    for obj in scene["objects"]:
        assert f"{obj['colour']} {obj['kind']}" in text
    emb = world.text_embedding(text, 16, 48)
    words = len(text.replace(",", "").split())
    assert emb.shape == (48, 16) and emb[words:].abs().sum() == 0 and (emb[:words].abs().sum(-1) > 0).all()
    assert torch.equal(emb, world.text_embedding(text, 16, 48))
    other = world.text_embedding("a red sphere", 16, 48)
    assert torch.equal(other[0], world.text_embedding("a blue box", 16, 48)[0])  # same word, same place
    assert not torch.equal(other[1], world.text_embedding("a blue box", 16, 48)[1])
    assert world.text_embedding(text, 16, 4).shape == (4, 16)  # truncated


def check_clip(clip, frames, size, text_len=32, text_dim=32):
    assert clip["video"].shape == (3, frames, size, size)
    assert clip["video"].min() >= -1 and clip["video"].max() <= 1
    assert clip["w2c"].shape == (frames, 4, 4) and clip["K"].shape == (frames, 4)
    assert torch.equal(clip["w2c"][0], torch.eye(4))
    assert_rigid(clip["w2c"])
    assert clip["text"].shape == (text_len, text_dim) and isinstance(clip["caption"], str)
    assert 0 <= clip["scene_seed"] < world.EVAL_SEED_BASE
    assert cameras.load_cameras(clip["actions"]).num_frames == frames


def test_make_clip_depends_on_seed_and_index_only():
    clips = [world.make_clip(0, i, 4, 16, 16, 32, 32) for i in range(3)]
    for clip in clips:
        check_clip(clip, 4, 16)
    assert len({c["scene_seed"] for c in clips}) == 3
    again = world.make_clip(0, 1, 4, 16, 16, 32, 32)
    assert torch.equal(again["video"], clips[1]["video"]) and again["actions"] == clips[1]["actions"]
    other = world.make_clip(1, 1, 4, 16, 16, 32, 32)
    assert other["scene_seed"] != clips[1]["scene_seed"]


def test_heldout_paths_are_held_out_fixed_and_moving():
    held = [world.heldout_path(i, 5) for i in range(3)]
    assert [s for s, *_ in held] == [world.EVAL_SEED_BASE + i for i in range(3)]
    for seed, actions, cams in held:
        assert cams.num_frames == 5
        assert "x" not in actions  # moving paths only
        assert (cameras.mirror_cameras(cams).w2c - cams.w2c).abs().max() > 0.1
    again = [world.heldout_path(i, 5) for i in range(3)]
    assert all(torch.equal(a[2].w2c, b[2].w2c) and a[1] == b[1] for a, b in zip(held, again))
    assert world.heldout_path(0, 5, seed=1)[0] == world.EVAL_SEED_BASE + 100_000
    train = [world.make_clip(0, i, 2, 4, 4, 8, 4)["scene_seed"] for i in range(24)]
    assert max(train) < world.EVAL_SEED_BASE


def test_long_heldout_paths_wander_but_stay_in_the_scene():
    for i in range(3):
        scene_seed, actions, cams = world.long_heldout_path(i, 512)
        assert scene_seed >= world.EVAL_SEED_BASE and cams.num_frames == 512
        assert world._path_ok(cams, scene_seed, margin=0.5)  # never inside an object, never far away
        centres, _ = world._world_centres(cams)
        assert (centres[:, [0, 2]].norm(dim=-1) > 2).float().mean() > 0.3  # it does leave the start
        steps = cameras.parse_actions(actions)
        assert sum("w" in s for s in steps) > 100 and sum(s in ("l", "j") for s in steps) > 20
    again = world.long_heldout_path(0, 512)
    assert again[1] == world.long_heldout_path(0, 512)[1]
    assert world.long_heldout_path(0, 64)[1] == again[1][:len(world.long_heldout_path(0, 64)[1])]


def test_redraw_unseen_keeps_what_frame_0_shows_and_moves_the_rest_off_the_path():
    places = lambda scene: [o["centre"].tolist() for o in scene["objects"]]
    moved_any = False
    for i in range(3):
        scene_seed, _, cams = world.long_heldout_path(i, 96)
        scene, redrawn = world.make_scene(scene_seed), world.redraw_unseen(scene_seed, cams, 16, 16)
        assert places(redrawn) == places(world.redraw_unseen(scene_seed, cams, 16, 16))  # fixed for a draw
        truth = world.render_world(scene_seed, cams, 16, 16)
        video = world.render_world(scene_seed, cams, 16, 16, scene=redrawn)
        assert torch.equal(video[:, 0], truth[:, 0])  # frame 0 is exactly the true one
        centres, _ = world._world_centres(cams)
        for old, new in zip(scene["objects"], redrawn["objects"]):
            assert (old["kind"], old["colour"], old["half"].tolist()) == (new["kind"], new["colour"], new["half"].tolist())
            assert new["centre"][1] == old["centre"][1]  # still resting on the ground
            if not np.array_equal(old["centre"], new["centre"]):
                moved_any = True
                assert world._gap(new, centres).min() >= 1.0  # the path never runs into it
                assert 3.5 <= np.linalg.norm(new["centre"][[0, 2]]) <= 8  # where make_scene puts objects
        if places(redrawn) != places(scene):
            assert (video[:, 1:] - truth[:, 1:]).abs().amax() > 0.1  # later frames see the other places
            assert places(world.redraw_unseen(scene_seed, cams, 16, 16, draw=1)) != places(redrawn)
        kept = world.redraw_unseen(scene_seed, cams, 16, 16, invent=False)  # the same, with the unseen left out
        assert places(kept) == [p for p, q in zip(places(scene), places(redrawn)) if p == q]
        assert torch.equal(world.render_world(scene_seed, cams, 16, 16, scene=kept)[:, 0], truth[:, 0])
    assert moved_any


def test_invent_nothing_world_keeps_a_shadow_frame_0_shows_but_not_what_casts_it():
    # long held-out path 39 at 32x32: object 3, a yellow sphere, reaches frame 0 only as its shadow on the ground
    scene_seed, _, cams = world.long_heldout_path(39, 128, 0, 32, 32)
    first, scene = Cameras(cams.w2c[:, :1], cams.K[:, :1]), world.make_scene(scene_seed)
    assert 3 in world.objects_shown(scene_seed, first, 32, 32)  # it changes frame 0 ...
    assert world.objects_shown(scene_seed, first, 32, 32, shadows=False) == [0]  # ... but none of its rays hits it
    bare = world.render_world(scene_seed, first, 32, 32, scene={**scene, "objects": []})
    alone, labels = world.render_world(scene_seed, first, 32, 32, True,
                                       scene={**scene, "objects": [scene["objects"][3]]})
    changed = (alone - bare).abs().amax(0) > 0  # (1, H, W)
    assert changed.sum() > 20 and (labels[changed] == world.GROUND).all()  # only ground pixels: its shadow
    assert (alone - bare)[:, changed].amax() < 0  # darker, nothing drawn
    for i in range(6):  # the body-only set is within the other on any path
        s, _, c = world.long_heldout_path(i, 8, 0, 32, 32)
        f0 = Cameras(c.w2c[:, :1], c.K[:, :1])
        assert set(world.objects_shown(s, f0, 32, 32, shadows=False)) <= set(world.objects_shown(s, f0, 32, 32))

    kept = world.redraw_unseen(scene_seed, cams, 32, 32, invent=False)  # invents nothing
    assert [o.get("body", True) for o in kept["objects"]] == [True, False]  # object 0 and object 3's shadow
    assert np.array_equal(kept["objects"][1]["centre"], scene["objects"][3]["centre"])
    truth, true_labels = world.render_world(scene_seed, cams, 32, 32, True)
    video, labels = world.render_world(scene_seed, cams, 32, 32, True, scene=kept)
    assert torch.equal(video[:, 0], truth[:, 0])  # frame 0 exactly, the shadow included
    sphere = true_labels == 2 + 3  # (F, H, W) where the truth shows the sphere, later on the path
    assert sphere.sum() > 500 and not sphere[0].any()
    assert (labels[sphere] != 2 + 1).all() and (video - truth).abs().amax(0)[sphere].mean() > 0.3  # not drawn there
    drawn = world.redraw_unseen(scene_seed, cams, 32, 32)  # a perfect model: the shadow says where it stands
    assert np.array_equal(drawn["objects"][3]["centre"], scene["objects"][3]["centre"])
    assert all(o.get("body", True) for o in drawn["objects"])


def test_reveal_clips_turn_towards_an_object_frame_0_does_not_show():
    kinds = []
    for i in range(6):
        clip = world.make_clip(0, i, 8, 32, 32, 8, 16, reveal=1.0)
        again = world.make_clip(0, i, 8, 32, 32, 8, 16, reveal=1.0)
        assert torch.equal(again["video"], clip["video"]) and again["actions"] == clip["actions"]
        assert torch.equal(world.make_clip(0, i, 8, 32, 32, 8, 16)["video"],  # reveal=0: the clips of a run without it
                           world.make_clip(0, i, 8, 32, 32, 8, 16, reveal=0.0)["video"])
        steps = cameras.parse_actions(clip["actions"])
        kinds.append(len(set(steps)) == 1 and steps[0] in ("l", "j", "wl", "wj"))
        if not kinds[-1]:
            continue  # no reachable unseen object in this scene: an ordinary clip
        cams = Cameras(clip["w2c"][None], clip["K"][None])
        _, labels = world.render_world(clip["scene_seed"], cams, 32, 32, return_labels=True, supersample=1)
        entered = set(labels[-1].unique().tolist()) - set(labels[0].unique().tolist()) - {world.SKY, world.GROUND}
        assert any((labels[-1] == k).float().mean() >= 0.04 for k in entered)  # it stands in the last frame
        assert world._path_ok(cams, clip["scene_seed"])
    assert sum(kinds) >= 4


def test_training_clips_can_carry_the_world_frame_0_shows():
    # make_clip(shown=True): the same path with the objects frame 0 does not show left out (--anchor_on=shown);
    # frame 0 is the same, and a revealing clip's last frame differs where the object enters
    differs = 0
    for i in range(4):
        clip = world.make_clip(0, i, 8, 32, 32, 8, 16, reveal=1.0, shown=True)
        assert torch.equal(clip["video"], world.make_clip(0, i, 8, 32, 32, 8, 16, reveal=1.0)["video"])
        assert torch.equal(clip["shown"][:, 0], clip["video"][:, 0])
        differs += not torch.equal(clip["shown"][:, -1], clip["video"][:, -1])
    assert differs >= 2


def test_reveal_replaces_wandering_clips_too():
    # Stage 1's long clips (wander) take --reveal as Phase 1's do: a revealing clip is a turn or arc of the
    # clip's whole length; reveal=0 leaves the wandering clips of a run without it
    for i in range(2):
        clip = world.make_clip(0, i, 24, 32, 32, 8, 16, wander=True, reveal=1.0)
        steps = cameras.parse_actions(clip["actions"])
        assert len(steps) == 23 and len(set(steps)) == 1 and steps[0] in ("l", "j", "wl", "wj")
        plain = world.make_clip(0, i, 24, 32, 32, 8, 16, wander=True)
        assert len(set(cameras.parse_actions(plain["actions"]))) > 1  # a wandering path mixes its moves
        assert torch.equal(plain["video"], world.make_clip(0, i, 24, 32, 32, 8, 16, wander=True, reveal=0.0)["video"])
