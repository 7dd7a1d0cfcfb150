"""mmdit.py (HunyuanVideo-1.5 / HY-WorldPlay MMDiT) and --fsdp: parity with diffusers both ways, the real
names and shapes on the meta device, PRoPE invariance, the branch and action_in exact at init, cache ==
teacher forcing with the text K/V computed once, WorldPlay's action labels, a WorldPlay-layout checkpoint
through Stage 1, DMD and infer.py, and FSDP == DDP with an exact resume."""
import json
import os
import re

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel
from safetensors.torch import save_file

import cameras
import common
import mmdit
import model as M
import prope

from helpers import ranks_failure, run
from test_model import random_cameras

REF = os.path.join(os.path.dirname(__file__), "reference")
HY_MAP = json.load(open(os.path.join(REF, "hy1.5.original-to-diffusers.json")))  # diffusers name -> {from, op, shape}


def randomize(net, std=0.1, seed=0):
    """Default inits leave zeros and ones (and zero-init branches) that would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net.eval()


def hy_to_diffusers(sd):
    """Original names -> diffusers', by the reference map (its row offsets are the 8B's: a fused qkv is cut in
    thirds, whatever the width); every original tensor must be used."""
    out, used = {}, set()
    for name, e in HY_MAP.items():
        if e["from"] not in sd:
            continue  # a tiny model has fewer blocks
        v, op = sd[e["from"]], e["op"]
        used.add(e["from"])
        if op == "copy":
            out[name] = v
        elif op.startswith("rows"):
            a, b = map(int, re.findall(r"\d+", op))
            n = v.shape[0] // 3
            out[name] = v[a // (b - a) * n:(a // (b - a) + 1) * n]
        else:  # swap_halves
            out[name] = torch.cat(v.chunk(2, 0)[::-1], 0)
    assert used == set(sd)
    return out


# two random tiny configs: (diffusers kwargs, latents (C, F, H, W))
CONFIGS = [
    (dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_refiner_layers=1,
          patch_size=2, patch_size_t=1, text_embed_dim=24, text_embed_2_dim=20, image_embed_dim=12, rope_axes_dim=(4, 6, 6)),
     (4, 3, 6, 8)),
    (dict(in_channels=7, out_channels=3, num_attention_heads=1, attention_head_dim=24, num_layers=1, num_refiner_layers=2,
          patch_size=1, patch_size_t=1, text_embed_dim=8, text_embed_2_dim=6, image_embed_dim=10, rope_axes_dim=(8, 8, 8)),
     (3, 2, 3, 5)),
]


def parity_inputs(kw, shape, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    C, F_, H, W = shape
    x = torch.randn(B, kw["in_channels"], F_, H, W, generator=g)
    return dict(x=x, t=torch.tensor([130.0, 870.0]), ctx=torch.randn(B, 5, kw["text_embed_dim"], generator=g),
                ctx2=torch.randn(B, 4, kw["text_embed_2_dim"], generator=g),
                img=torch.randn(B, 3, kw["image_embed_dim"], generator=g), C=C)


def both(ref, ours, i, extra=True):
    """(diffusers output, ours) on the same inputs; extra=False: no byT5 / SigLIP tokens (diffusers: masked out)."""
    B = i["x"].shape[0]
    x, cond = i["x"][:, :i["C"]], i["x"][:, i["C"]:]
    with torch.no_grad():
        if extra:
            a = ref(i["x"], i["t"], i["ctx"], torch.ones(B, 5), encoder_hidden_states_2=i["ctx2"],
                    encoder_attention_mask_2=torch.ones(B, 4), image_embeds=i["img"], return_dict=False)[0]
            b = ours(x, i["t"], i["ctx"], None, cond, context_2=i["ctx2"], image_embeds=i["img"])
        else:
            a = ref(i["x"], i["t"], i["ctx"], torch.ones(B, 5), encoder_hidden_states_2=i["ctx2"],
                    encoder_attention_mask_2=torch.zeros(B, 4), image_embeds=torch.zeros_like(i["img"]), return_dict=False)[0]
            b = ours(x, i["t"], i["ctx"], None, cond)
    return a, b


@pytest.mark.parametrize("kw,shape", CONFIGS)
def test_parity_with_diffusers_folder_and_shards(tmp_path, kw, shape):
    torch.manual_seed(0)
    ref = randomize(HunyuanVideo15Transformer3DModel(mlp_ratio=4.0, **kw))
    ref.save_pretrained(tmp_path / "d")
    ours = M.load_pretrained(tmp_path / "d").eval()
    assert isinstance(ours, mmdit.MMDiT)
    c = ours.cfg
    assert (c.num_heads, c.num_layers, c.refiner_layers, c.rope_split) == (
        kw["num_attention_heads"], kw["num_layers"], kw["num_refiner_layers"], kw["rope_axes_dim"])
    i = parity_inputs(kw, shape)
    for extra in (True, False):
        a, b = both(ref, ours, i, extra)
        assert (a - b).abs().max() < 1e-4 and a.abs().max() > 0.1
    # the timestep and the extra tokens matter (the parity above is not vacuous)
    assert (both(ref, ours, i, True)[1] - both(ref, ours, i, False)[1]).abs().max() > 1e-3
    # shards: the same model
    ref.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    assert any(f.endswith(".index.json") for f in os.listdir(tmp_path / "s"))
    sharded = M.load_pretrained(tmp_path / "s").eval()
    assert all(torch.equal(v, sharded.state_dict()[k]) for k, v in ours.state_dict().items())


def test_original_layout_back_into_diffusers():
    kw, shape = CONFIGS[0]
    cfg = mmdit.MMDiTConfig(dim=32, num_heads=2, num_layers=2, refiner_layers=1, in_channels=9, out_channels=4,
                            patch_size=(1, 2, 2), text_dim=24, byt5_dim=20, vision_dim=12, rope_axes=(4, 6, 6),
                            prope="none", action=False)
    ours = randomize(mmdit.MMDiT(cfg), seed=3)
    sd = ours.state_dict()
    ref = HunyuanVideo15Transformer3DModel(mlp_ratio=4.0, **kw).eval()
    ref.load_state_dict(hy_to_diffusers(sd), strict=True)
    a, b = both(ref, ours, parity_inputs(kw, shape))
    assert (a - b).abs().max() < 1e-4
    back = mmdit.diffusers_to_hy(hy_to_diffusers(sd))  # and our converter inverts the reference map exactly
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_converter_at_full_size_and_presets_on_meta():
    hy = json.load(open(os.path.join(REF, "hy1.5-480p.original-shapes.json")))
    wp = json.load(open(os.path.join(REF, "hy-worldplay.original-shapes.json")))
    # diffusers' 1,801 names -> exactly the release's 1,793 names and shapes
    conv = mmdit.diffusers_to_hy({k: torch.empty(e["shape"], device="meta") for k, e in HY_MAP.items()})
    assert {k: list(v.shape) for k, v in conv.items()} == hy
    for k, e in HY_MAP.items():  # one tensor at a time: every copy lands on its own name
        if e["op"] == "copy":
            assert list(mmdit.diffusers_to_hy({k: torch.empty(0)})) == [e["from"]]
    for preset, shapes, n in (("hy1.5-ti2v-8b", hy, 8_326_608_160), ("hy-worldplay", wp, 8_557_933_856)):
        with torch.device("meta"):
            net = M.build(M.make_config(preset))
        assert {k: list(v.shape) for k, v in net.state_dict().items()} == shapes
        assert net.num_params() == n and len(shapes) == {"hy1.5-ti2v-8b": 1793, "hy-worldplay": 1905}[preset]


def tiny(prope_mode="inline", action=True, prope_text=False, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = mmdit.MMDiTConfig(dim=32, num_heads=2, num_layers=2, refiner_layers=1, in_channels=9, out_channels=4,
                            text_dim=8, prope=prope_mode, prope_text=prope_text, action=action, chunk=2, **kw)
    return mmdit.MMDiT(cfg).eval()


def wake(net, std=0.3):
    """Give the zero-initialized WorldPlay parts (branch projection, action_in's last layer) weights."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "prope_proj" in name or name.startswith("action_in.mlp.2") or name.startswith("cond_type"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def inputs(B=2, F=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, F, 4, 4, generator=g), torch.tensor([300.0, 700.0][:B]), torch.randn(B, 3, 8, generator=g),
            random_cameras(B, F, g))


@pytest.mark.parametrize("mode", ["inline", "branch"])
def test_prope_invariance_to_world_frame(mode):
    net = wake(tiny(mode))
    x, t, ctx, cams = inputs()
    G = random_cameras(1, 1, torch.Generator().manual_seed(5), trans=2.0).w2c[0, 0]
    moved = prope.Cameras(cams.w2c @ G, cams.K)
    with torch.no_grad():
        a = net(x, t, ctx, cams)
        assert ((a - net(x, t, ctx, moved)).norm() / a.norm()) < 1e-4
        scaled = prope.Cameras(cams.w2c.clone(), cams.K)  # translations' scale is seen
        scaled.w2c[..., :3, 3] *= 3.0
        assert ((net(x, t, ctx, scaled) - a).norm() / a.norm()) > 1e-3
        if mode == "branch":  # WorldPlay's branch also sees the (camera-free) text keys: then it is not invariant
            net.cfg.prope_text = True
            b = net(x, t, ctx, cams)
            assert ((b - net(x, t, ctx, moved)).norm() / b.norm()) > 1e-3


def test_enable_prope_branch_on_hy15_equals_a_model_built_with_it():
    # HunyuanVideo-1.5 is camera-free; Phase 1 from it adds WorldPlay's branch in place (train_bidir --init)
    net = randomize(tiny("none", action=False), seed=4)
    x, t, ctx, cams = inputs()
    with torch.no_grad():
        base = net(x, t, ctx, cams)
        assert M.enable_prope_branch(net) is net and net.cfg.prope == "branch"
        assert torch.equal(net(x, t, ctx, cams), base)
        built = tiny("branch", action=False)
        assert set(net.state_dict()) == set(built.state_dict())
        for block in net.double_blocks:
            block.img_attn_prope_proj.weight.normal_(0, 0.3)
        built.load_state_dict(net.state_dict())
        got = net(x, t, ctx, cams)
        assert (got - built(x, t, ctx, cams)).abs().max() < 1e-6
        assert (got - base).abs().max() > 1e-3


def test_branch_and_action_exact_at_init():
    net = tiny("branch", action=True, prope_text=True)
    x, t, ctx, cams = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t, ctx, cams), net(x, t, ctx, None))  # zero-init img_attn_prope_proj, action_in
        net.double_blocks[0].img_attn_prope_proj.weight.normal_(0, 0.3)
        assert (net(x, t, ctx, cams) - net(x, t, ctx, None)).abs().max() > 1e-3
        net = tiny("none", action=True)
        base = net(x, t, ctx, cams)
        net.action_in.mlp[2].weight.normal_(0, 0.3)
        assert (net(x, t, ctx, cams) - base).abs().max() > 1e-3


@pytest.mark.parametrize("mode,action,prope_text", [("inline", True, False), ("branch", True, True), ("none", False, False)])
def test_cache_rollout_equals_teacher_forcing_text_kv_once(mode, action, prope_text):
    net = wake(tiny(mode, action, prope_text, seed=3))
    B, F_ = 2, 6  # 3 chunks of 2 frames
    g = torch.Generator().manual_seed(1)
    clean, noisy = torch.randn(B, 4, F_, 4, 4, generator=g), torch.randn(B, 4, F_, 4, 4, generator=g)
    ctx, cams = torch.randn(B, 3, 8, generator=g), random_cameras(B, F_, g)
    cond = M.image_cond(clean[:, :, 0], F_)
    t = torch.tensor([[900.0, 900.0, 500.0, 500.0, 100.0, 100.0], [700.0, 700.0, 300.0, 300.0, 50.0, 50.0]])
    calls = []
    net.txt_in.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        tf = net(noisy, t, ctx, cams, cond, clean=clean)
        cache = net.new_cache(B, 4, 4, sink=1, window=8)
        outs = []
        for s in range(0, F_, 2):
            sl = slice(s, s + 2)
            c_cams, c_cond = cams.frames(s, s + 2), cond[:, :, sl]
            outs.append(net(noisy[:, :, sl], t[:, sl], ctx, c_cams, c_cond, cache=cache, frame_offset=s))
            net(clean[:, :, sl], torch.zeros(B, 2), ctx, c_cams, c_cond, cache=cache, frame_offset=s, commit=True)
        assert (torch.cat(outs, 2) - tf).abs().max() < 1e-4
        assert len(calls) == 2  # once for teacher forcing, once for the whole 6-call rollout
        assert (net(noisy, t, ctx, cams, cond) - tf).abs().max() > 1e-2  # the causal mask is not a no-op
        other = ctx + 1  # another text: its K/V replace the cached ones
        net(noisy[:, :, :2], t[:, :2], other, cams.frames(0, 2), cond[:, :, :2], cache=cache, frame_offset=6)
        assert len(calls) == 4 and cache.text[0][0] is other
        cache.reset()  # a new rollout: no text, no frames, no previous camera
        assert cache.text[0] is None and cache.filled == 0 and cache.last_w2c is None


def test_windowed_rollout_equals_windowed_teacher_forcing():
    """Past the window the ring evicts the oldest frames; the actions still see the frame before each chunk."""
    net = wake(tiny("branch", True, True, seed=4))
    B, F_, sink, window = 1, 12, 1, 3  # 6 chunks of 2 frames: the ring fills and wraps
    g = torch.Generator().manual_seed(2)
    clean, noisy = torch.randn(B, 4, F_, 4, 4, generator=g), torch.randn(B, 4, F_, 4, 4, generator=g)
    ctx, cams = torch.randn(B, 3, 8, generator=g), random_cameras(B, F_, g)
    cond = M.image_cond(clean[:, :, 0], F_)
    t = torch.rand(B, F_ // 2, generator=g).repeat_interleave(2, 1) * 1000
    with torch.no_grad():
        tf = net(noisy, t, ctx, cams, cond, clean=clean, sink=sink, window=window)
        cache = net.new_cache(B, 4, 4, sink=sink, window=window)
        outs = []
        for s in range(0, F_, 2):
            sl, c = slice(s, s + 2), cams.frames(s, s + 2)
            outs.append(net(noisy[:, :, sl], t[:, sl], ctx, c, cond[:, :, sl], cache=cache, frame_offset=s))
            net(clean[:, :, sl], torch.zeros(B, 2), ctx, c, cond[:, :, sl], cache=cache, frame_offset=s, commit=True)
        assert (torch.cat(outs, 2) - tf).abs().max() < 1e-4
        assert (net(noisy, t, ctx, cams, cond, clean=clean) - tf).abs().max() > 1e-3  # the window cuts context


def test_flex_mask_and_activation_checkpointing_match_the_dense_path():
    import warnings
    net = wake(tiny("branch", True, True, seed=5))  # the branch attends with and without the text columns
    B, F_ = 2, 6
    g = torch.Generator().manual_seed(3)
    clean, noisy = torch.randn(B, 4, F_, 4, 4, generator=g), torch.randn(B, 4, F_, 4, 4, generator=g)
    ctx, cams, t = torch.randn(B, 3, 8, generator=g), random_cameras(B, F_, g), torch.rand(B, F_, generator=g) * 1000
    cond = M.image_cond(clean[:, :, 0], F_)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled on the CPU
        for sink, window in ((0, None), (1, 2)):
            out = []
            for flex in (False, True):
                net.flex = flex
                out.append(net(noisy, t, ctx, cams, cond, clean=clean, sink=sink, window=window))
            assert (out[0] - out[1]).abs().max() < 1e-5
    net.flex = None
    block = mmdit.teacher_forcing_text_block_mask(F_, 2, 4, 3, torch.device("cpu"), 1, 2)
    q, k = torch.arange(2 * F_ * 4), torch.arange(2 * F_ * 4 + 3)
    dense = M.teacher_forcing_mask(F_, 2, 4, None, 1, 2)
    assert torch.equal(block.mask_mod(0, 0, q[:, None], k[None, :]), torch.cat([dense, torch.ones(len(dense), 3)], 1).bool())
    for kw in (dict(clean=clean), dict()):  # teacher forcing and bidirectional
        grads = []
        for ckpt in (False, True):
            net.zero_grad()
            net.grad_ckpt = ckpt
            net(noisy, t, ctx, cams, cond, **kw).pow(2).mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
        assert grads[0].abs().max() > 0 and grads[0].shape == grads[1].shape
        assert (grads[0] - grads[1]).abs().max() < 1e-6


def test_bf16_parameters_close_to_fp32():
    net = tiny("branch", True, True, seed=8)
    half = tiny("branch", True, True, seed=8).to(torch.bfloat16)
    B, F_ = 2, 4
    g = torch.Generator().manual_seed(6)
    x, ctx, cams = torch.randn(B, 4, F_, 4, 4, generator=g), torch.randn(B, 3, 8, generator=g), random_cameras(B, F_, g)
    cond, t = M.image_cond(x[:, :, 0], F_), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        for kw in (dict(), dict(clean=x)):
            a, b = net(x, t, ctx, cams, cond, **kw), half(x, t, ctx, cams, cond, **kw)
            assert b.dtype == torch.float32 and (a - b).abs().mean() < 0.02 * a.abs().mean()
        few = M.few_step_sigmas()
        s1 = M.sample_ar(net, x, ctx, cams, cond, few, renoise=True, generator=torch.Generator().manual_seed(0))
        s2 = M.sample_ar(half, x, ctx, cams, cond, few, renoise=True, generator=torch.Generator().manual_seed(0))
        assert (s1 - s2).abs().mean() < 0.02 * s1.abs().mean()


def test_action_labels_follow_worldplay(tmp_path):
    # our action vocabulary, one step per latent frame (frame 0: no motion)
    c = cameras.load_cameras("w,l,j,i,k,d,a,s,x,wl,dk")
    assert mmdit.action_labels(c.w2c)[0].tolist() == [0, 9, 1, 2, 3, 4, 27, 36, 18, 0, 10, 31]
    # a file in WorldPlay's format, built as WorldPlay's trajectory generator builds it (c2w, +z forward,
    # "right" = c2w @ rot_y(+3°), "up" = c2w @ rot_x(+3°)), read by cameras.load_cameras
    w2c = cameras.load_cameras(worldplay_camera_file(str(tmp_path / "pose.json"), 6)).w2c
    assert mmdit.action_labels(w2c)[0].tolist() == [0, 9, 9, 1, 3, 2 * 9 + 2]  # last: backward + yaw left
    # the label of a chunk's first frame comes from the frame before it (the cache keeps it)
    assert mmdit.action_labels(w2c[:, 3:], prev=w2c[:, 2])[0].tolist() == [1, 3, 20]


def worldplay_camera_file(path, frames):
    """{"i": {"extrinsic": c2w 4x4, "K": 3x3 pixels}}: forward, forward, yaw right, pitch up, back + yaw left."""
    def rot(axis, deg):
        a = np.deg2rad(deg)
        c, s = np.cos(a), np.sin(a)
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) if axis == "x" else np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    moves = [dict(forward=0.08), dict(forward=0.08), dict(yaw=3), dict(pitch=3), dict(forward=-0.08, yaw=-3)]
    T, poses = np.eye(4), [np.eye(4)]
    for m in moves[:frames - 1]:
        if "yaw" in m:
            T[:3, :3] = T[:3, :3] @ rot("y", m["yaw"])
        if "pitch" in m:
            T[:3, :3] = T[:3, :3] @ rot("x", m["pitch"])
        T[:3, 3] += T[:3, :3] @ np.array([0, 0, m.get("forward", 0.0)])
        poses.append(T.copy())
    K = [[969.7, 0.0, 960.0], [0.0, 969.7, 540.0], [0.0, 0.0, 1.0]]
    json.dump({str(i): {"extrinsic": p.tolist(), "K": K} for i, p in enumerate(poses)}, open(path, "w"))
    return path


def test_worldplay_checkpoint_through_stage1_dmd_and_infer(tmp_path):
    """A random tiny network in HY-WorldPlay's original key layout (action_in, img_attn_prope_proj), written as a
    bare .safetensors, loads exactly and takes one Stage 1 step, one DMD step and a 3-chunk rollout from a
    camera file in WorldPlay's format."""
    cfg = mmdit.MMDiTConfig(dim=32, num_heads=2, num_layers=2, refiner_layers=1, prope="branch", prope_text=True,
                            action=True)  # 12 latent channels + condition (the embedded world's pixel codec)
    net = randomize(mmdit.MMDiT(cfg), std=0.05)
    sd = net.state_dict()
    assert sum(k.startswith("action_in.") for k in sd) == 4 and sum("img_attn_prope_proj" in k for k in sd) == 4
    ckpt = str(tmp_path / "worldplay.safetensors")
    save_file(sd, ckpt)
    loaded = M.load_pretrained(ckpt).eval()
    assert (loaded.cfg.prope, loaded.cfg.prope_text, loaded.cfg.action) == ("branch", True, True)
    x, t, ctx, cams = torch.randn(1, 12, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 4, 64), random_cameras(1, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx, cams), net(x, t, ctx, cams))
    cam_file = worldplay_camera_file(str(tmp_path / "pose.json"), 6)
    out = str(tmp_path / "o")
    r = run(["train_ar.py", f"--ckpt={ckpt}", "--quick", "--max_steps=1", "--eval_clips=1", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(["train_dmd.py", f"--ckpt={ckpt}", f"--teacher={ckpt}", "--quick", "--max_steps=1", "--critic_steps=1",
             "--eval_clips=1", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("ar", "dmd"):
        ck = common.load_checkpoint(f"{out}/{name}")
        assert ck["meta"]["step"] == 1 and ck["meta"]["model"]["prope_text"]
        assert max((ck["state"][k] - sd[k]).abs().max().item() for k in sd) > 1e-6  # the step moved the weights
        assert isinstance(M.load_pretrained(f"{out}/{name}"), mmdit.MMDiT)  # and the minWM checkpoint loads back
    r = run(["infer.py", f"--ckpt={ckpt}", f"--cameras={cam_file}", "--height=16", "--width=16", f"--out={out}/wp.mp4"])
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.load(open(f"{out}/wp.json"))
    assert report["chunks"] == 3 and report["frames"] == 6


def test_bad_input_one_line_errors(tmp_path):
    net = tiny("none", action=False)
    x, t, ctx, _ = inputs()
    with pytest.raises(ValueError, match="no projection"):
        net(x, t, ctx, context_2=torch.randn(2, 3, 5))
    save_file({"double_blocks.0.img_attn_q.weight": torch.zeros(4, 4)}, tmp_path / "hy.safetensors")
    with pytest.raises(ValueError, match="without img_in.proj.weight") as e:
        M.load_pretrained(tmp_path / "hy.safetensors")
    assert "\n" not in str(e.value) and "HunyuanVideo-1.5" in str(e.value)
    save_file({"double_blocks.0.img_attn_q.weight": torch.zeros(4, 4), "single_blocks.0.linear1.weight": torch.zeros(2)},
              tmp_path / "hyv1.safetensors")
    with pytest.raises(ValueError, match="single-stream"):
        M.load_pretrained(tmp_path / "hyv1.safetensors")
    save_file(wake(tiny("branch")).state_dict(), tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="not MMDiT settings: ffn_dim"):
        M.load_pretrained(tmp_path / "t.safetensors", ffn_dim=3)
    with pytest.raises(ValueError, match="tiny-mmdit"):
        M.make_config("tiny-mmdt")


def test_fsdp_equals_ddp_and_resumes_exactly(tmp_path):
    """torch's fully_shard over 2 gloo processes: the same losses and checkpoints as DDP for two steps (the
    MMDiT, whose last text block gets no gradient), and a run cut after step 1 and resumed ends identical."""
    args = ["train_bidir.py", "--preset=tiny-mmdit", "--quick", "--max_steps=2", "--batch_size=4",
            "--eval_every=100", "--log_every=1"]
    runs = {"ddp": [], "fsdp": ["--fsdp"], "cut": ["--fsdp", "--stop_after=1"]}
    for name, extra in runs.items():
        r = run(args + extra + [f"--out_dir={tmp_path}/{name}"], torchrun=True, port=29547)
        assert r.returncode == 0, ranks_failure(r)
    r = run(args + ["--fsdp", "--resume", f"--out_dir={tmp_path}/cut"], torchrun=True, port=29547)
    assert r.returncode == 0, ranks_failure(r)
    losses = {n: [json.loads(l)["loss"] for l in open(f"{tmp_path}/{n}/bidir.metrics.jsonl") if '"loss"' in l]
              for n in runs}
    assert len(losses["ddp"]) == 2 and losses["ddp"][1] != losses["ddp"][0]
    assert np.allclose(losses["fsdp"], losses["ddp"], rtol=1e-5, atol=0) and losses["cut"] == losses["fsdp"]
    cks = {n: common.load_checkpoint(f"{tmp_path}/{n}/bidir") for n in runs}
    for n in ("fsdp", "cut"):
        for part in ("state", "ema"):
            assert max((cks[n][part][k] - cks["ddp"][part][k]).abs().max().item() for k in cks["ddp"][part]) < 1e-6
        a, b = cks[n]["opt"]["optimizer"]["state"], cks["ddp"]["opt"]["optimizer"]["state"]  # DDP's file format
        assert a.keys() == b.keys() and max((a[i]["exp_avg"] - b[i]["exp_avg"]).abs().max().item() for i in a) < 1e-6
    loaded = M.load_pretrained(f"{tmp_path}/fsdp/bidir")  # the minWM checkpoint of an MMDiT loads back as one
    assert isinstance(loaded, mmdit.MMDiT) and all(torch.equal(v, cks["fsdp"]["ema"][k]) for k, v in loaded.state_dict().items())
