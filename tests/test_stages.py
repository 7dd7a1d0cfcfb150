"""Stages 1-3 and infer: masks, losses going down, ODE pairs on disk, the CD target, DMD's gradient path
and its toy-distribution behaviour, resume, streaming inference from a pipe and from long files."""
import copy
import json
import os
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file

import common
import cameras
import data
import model as M
import train_cd
import train_dmd
import train_ode

from helpers import run


def tiny_net(seed=0, **kw):
    torch.manual_seed(seed)
    return M.DiT(M.make_config("tiny", dim=64, ffn_dim=128, num_layers=2, **kw))


def batch(B=4, F=4, seed=0):
    cfg = type("C", (), dict(seed=seed, batch_size=B, frames=F, height=16, width=16, text_len=8, text_drop=0.0,
                             camera_noise=0.0, data=""))
    return data.training_source(cfg, M.make_config("tiny"))[1](0, 0, 1)


def fit(loss_fn, params, steps=40, lr=2e-3):
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_ar_teacher_forcing_loss_decreases():
    net, b = tiny_net(), batch()
    cond = M.image_cond(b["x0"][:, :, 0], 4)
    sigma = torch.tensor([[0.9, 0.9, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.2, 0.2, 0.8, 0.8], [0.6, 0.6, 0.1, 0.1]])
    losses = fit(lambda: M.flow_matching_loss(net, b["x0"], b["noise"], sigma, b["text"], b["cameras"], cond, clean=b["x0"]),
                 net.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_trained_teacher_forcing_model_rolls_out_like_its_forward():
    """A model trained with teacher forcing, rolled out through the KV cache, equals its TF forward."""
    net, b = tiny_net(chunk=2), batch()
    cond = M.image_cond(b["x0"][:, :, 0], 4)
    sigma = torch.full((4, 4), 0.5)
    fit(lambda: M.flow_matching_loss(net, b["x0"], b["noise"], sigma, b["text"], b["cameras"], cond, clean=b["x0"]), net.parameters(), 5)
    net.eval()
    x_t = M.add_noise(b["x0"], b["noise"], 0.5)
    t = torch.full((4, 4), 500.0)
    with torch.no_grad():
        tf = net(x_t, t, b["text"], b["cameras"], cond, clean=b["x0"])
        cache = net.new_cache(4, 8, 8, window=4)
        outs = []
        for s in (0, 2):
            cams, c = b["cameras"].frames(s, s + 2), cond[:, :, s:s + 2]
            outs.append(net(x_t[:, :, s:s + 2], t[:, s:s + 2], b["text"], cams, c, cache=cache, frame_offset=s))
            net(b["x0"][:, :, s:s + 2], torch.zeros(4, 2), b["text"], cams, c, cache=cache, frame_offset=s, commit=True)
    assert (torch.cat(outs, 2) - tf).abs().max() < 1e-4


def test_ode_pairs_round_trip_and_resume(tmp_path):
    teacher = tiny_net().eval()
    cfg = replace(train_ode.Config(), **train_ode.QUICK, out_dir=str(tmp_path))  # 4 pairs, 8 ODE steps
    _, source = data.training_source(cfg, teacher.cfg)
    pairs_dir = str(tmp_path / "pairs")
    few, shards = train_ode.generate(cfg, teacher, source, pairs_dir, 0, 1, "cpu")
    assert shards == 2 and few == M.few_step_sigmas(cfg.timesteps, cfg.shift)[:-1]
    back = train_ode.load_pairs(pairs_dir, shards)
    # the stored states are the teacher's ODE at the few-step sigmas, starting from the stored noise
    b = source(10**6, 0, 1)
    states, end = train_ode.ode_pairs(teacher, b, M.euler_sigmas(8, 1.0), [0, 2, 4, 6], 1.0)
    assert torch.equal(back["states"][:2], states.half()) and torch.equal(back["ode_x0"][:2], end.half())
    assert torch.equal(back["x0"][:2], b["x0"].half()) and torch.equal(back["states"][:2, 0], b["noise"].half())
    # resume: a missing shard is regenerated bit-identically, the others are left alone
    first = os.path.join(pairs_dir, "shard_00000.safetensors")
    mtime = os.stat(first).st_mtime_ns
    os.remove(os.path.join(pairs_dir, "shard_00001.safetensors"))
    train_ode.generate(cfg, teacher, source, pairs_dir, 0, 1, "cpu")
    assert os.stat(first).st_mtime_ns == mtime
    again = train_ode.load_pairs(pairs_dir, shards)
    assert all(torch.equal(again[k], back[k]) for k in back)


def test_ode_loss_decreases():
    net, b = tiny_net(), batch()
    x_t, sigma = M.add_noise(b["x0"], b["noise"], 0.75), torch.full((4, 4), 0.75)
    target = b["x0"] + 0.1 * b["noise"]  # a fixed regression target standing in for the ODE end point
    losses = fit(lambda: train_ode.ode_loss(net, x_t, sigma, target, b["x0"], b["text"], b["cameras"]),
                 net.parameters())
    assert losses[-1] < 0.5 * losses[0]


def cd_setup():
    """A teacher, a student, its EMA, a batch, the condition, σ = 0.6 -> σ' = 0.5 and x_t."""
    teacher, b = tiny_net(seed=1).eval(), batch()
    student = tiny_net(seed=2)
    ema = copy.deepcopy(student).eval()
    cond = M.image_cond(b["x0"][:, :, 0], 4)
    sigma, sigma_next = torch.full((4, 4), 0.6), torch.full((4, 4), 0.5)
    return teacher, student, ema, b, cond, sigma, sigma_next, M.add_noise(b["x0"], b["noise"], 0.6)


def test_cd_target_comes_from_the_ema_weights():
    teacher, student, ema, b, cond, sigma, sigma_next, x_t = cd_setup()
    args = (x_t, sigma, sigma_next, b["text"], b["cameras"], cond, b["x0"])
    fit(lambda: train_cd.x0_of(student, x_t, sigma, b["text"], b["cameras"], cond, b["x0"]).pow(2).mean(),
        student.parameters(), steps=1)
    common.update_ema(ema, student, 0.95)
    with torch.no_grad():
        target = train_cd.cd_target(teacher, ema, *args)
        # by hand: one teacher Euler step, then the EMA student's x0
        v = teacher(x_t, 1000 * sigma, b["text"], b["cameras"], cond, clean=b["x0"])
        x_next = x_t - 0.1 * v
        by_hand = x_next - 0.5 * ema(x_next, 1000 * sigma_next, b["text"], b["cameras"], cond, clean=b["x0"])
        assert (target - by_hand).abs().max() < 1e-5
        assert (target - train_cd.cd_target(teacher, student, *args)).abs().max() > 1e-4  # EMA != student
    # at sigma' = 0 the target is the teacher's step itself
    zero = train_cd.cd_target(teacher, ema, x_t, sigma, torch.zeros(4, 4), *args[3:])
    with torch.no_grad():
        assert (zero - (x_t - 0.6 * teacher(x_t, 1000 * sigma, b["text"], b["cameras"], cond, clean=b["x0"]))).abs().max() < 1e-5


def test_cd_attends_as_the_rollout_cache():
    """CD's teacher-forced calls (the teacher's step, the target's and the student's x0) all take the rollout
    cache's mask (sink, window): on a clip longer than the window it changes them and equals the masked calls
    by hand; on a clip the window covers (the 8-frame recipe) it changes nothing."""
    teacher, b = tiny_net(seed=1, chunk=2).eval(), batch(F=8)
    student = tiny_net(seed=2, chunk=2).eval()
    cond = M.image_cond(b["x0"][:, :, 0], 8)
    sigma, sigma_next = torch.full((4, 8), 0.6), torch.full((4, 8), 0.5)
    x_t = M.add_noise(b["x0"], b["noise"], 0.6)
    args = (x_t, sigma, sigma_next, b["text"], b["cameras"], cond, b["x0"])
    with torch.no_grad():
        masked = train_cd.cd_target(teacher, student, *args, sink=1, window=2)
        v = teacher(x_t, 1000 * sigma, b["text"], b["cameras"], cond, clean=b["x0"], sink=1, window=2)
        x_next = x_t - 0.1 * v
        by_hand = x_next - 0.5 * student(x_next, 1000 * sigma_next, b["text"], b["cameras"], cond, clean=b["x0"],
                                         sink=1, window=2)
        assert (masked - by_hand).abs().max() < 1e-5
        assert (masked - train_cd.cd_target(teacher, student, *args)).abs().max() > 1e-3
        x0 = train_cd.x0_of(student, x_t, sigma, b["text"], b["cameras"], cond, b["x0"], sink=1, window=2)
        assert (x0 - (x_t - 0.6 * student(x_t, 600 * torch.ones(4, 8), b["text"], b["cameras"], cond, clean=b["x0"],
                                         sink=1, window=2))).abs().max() < 1e-5
        assert (x0 - train_cd.x0_of(student, x_t, sigma, b["text"], b["cameras"], cond, b["x0"])).abs().max() > 1e-3
        default = dict(sink=train_cd.Config.tf_sink, window=train_cd.Config.tf_window)  # covers an 8-frame clip
        assert (train_cd.cd_target(teacher, student, *args, **default) - train_cd.cd_target(teacher, student, *args)).abs().max() < 1e-5


def test_cd_loss_decreases():
    teacher, student, ema, b, cond, sigma, sigma_next, x_t = cd_setup()
    target = train_cd.cd_target(teacher, ema, x_t, sigma, sigma_next, b["text"], b["cameras"], cond, b["x0"])
    losses = fit(lambda: (train_cd.x0_of(student, x_t, sigma, b["text"], b["cameras"], cond, b["x0"]) - target)
                 .pow(2).mean(), student.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_dmd_gradient_only_through_the_exit_step():
    gen, b = tiny_net(chunk=2), batch(B=2)
    few = M.few_step_sigmas((1000, 750, 500, 250))
    calls = []
    hook = gen.register_forward_hook(lambda m, args, kw_out: calls.append(torch.is_grad_enabled()))
    x_g = train_dmd.self_rollout(gen, b["noise"], b["text"], b["cameras"], b["x0"][:, :, 0], few, exit_step=2)
    hook.remove()
    # 2 chunks x (2 steps before the exit + 1 exit + 1 cache refresh); only the exits track gradient
    assert calls == [False, False, True, False] * 2
    x_g.pow(2).mean().backward()
    grads = [p.grad for p in gen.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # with the last step as exit, the rollout is the few-step sampler itself
    gen.zero_grad()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        x0_last = train_dmd.self_rollout(gen, b["noise"], b["text"], b["cameras"], b["x0"][:, :, 0], few, 3, g1)
        cond = M.image_cond(b["x0"][:, :, 0], 4)
        sampled = M.sample_ar(gen, b["noise"], b["text"], b["cameras"], cond, few, renoise=True, generator=g2)
    assert (x0_last - sampled).abs().max() < 1e-4


def gaussian_score(mu, std=1.0):
    """A 'model' returning the exact flow-matching velocity of data N(mu, std²) (shape (B, 2, 1, 1, 1))."""
    def v(x_t, t, *args, **kw):
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        a = 1 - s
        x0 = mu + a * std ** 2 / (a ** 2 * std ** 2 + s ** 2) * (x_t - a * mu)  # E[x0 | x_t]
        return (x_t - x0) / s
    return v


def test_dmd_moves_a_toy_student_towards_the_real_distribution():
    torch.manual_seed(0)
    mu_real = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1, 1)
    mu_g = torch.zeros(1, 2, 1, 1, 1, requires_grad=True)  # the student: x_g = mu_g + z
    opt = torch.optim.SGD([mu_g], lr=1.0)
    start = (mu_g - mu_real).norm().item()
    for _ in range(100):
        x_g = mu_g + torch.randn(256, 2, 1, 1, 1)
        fake = gaussian_score(mu_g.detach())  # an ideal critic that knows the student's distribution
        loss = train_dmd.dmd_loss(x_g, gaussian_score(mu_real), fake, None, None, None,
                                  torch.rand(256) * 0.9 + 0.05, torch.randn_like(x_g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (mu_g - mu_real).norm().item() < 0.1 * start


def test_dmd_critic_loss_decreases():
    fake, b = tiny_net(), batch()
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8])
    cond = M.image_cond(b["x0"][:, :, 0], 4)
    losses = fit(lambda: M.flow_matching_loss(fake, b["x0"], b["noise"], sigma, b["text"], b["cameras"], cond),
                 fake.parameters())
    assert losses[-1] < 0.5 * losses[0]


@pytest.fixture(scope="module")
def quick_chain(tmp_path_factory):
    """bidir -> ar -> ode at smoke size, shared by the resume and infer tests; Phase 1 with 8 text tokens,
    which every later stage and infer.py take from their input checkpoint."""
    d = tmp_path_factory.mktemp("chain")
    for args in (["train_bidir.py", "--quick", "--text_len=8"], ["train_ar.py", "--quick", f"--ckpt={d}/bidir"],
                 ["train_ode.py", "--quick", f"--ckpt={d}/ar"]):
        r = run(args + [f"--out_dir={d}", "--eval_every=100"])
        assert r.returncode == 0, r.stderr[-2000:]
    return d


@pytest.mark.parametrize("stage,extra", [("ar", "--ckpt={d}/bidir"), ("ode", "--ckpt={d}/ar"),
                                         ("cd", "--ckpt={d}/ar"), ("dmd", "--ckpt={d}/ode --teacher={d}/bidir"),
                                         # Stage 3's second pass (pipeline.sh's dmd): the colour anchor on
                                         ("dmd", "--ckpt={d}/ode --teacher={d}/bidir --anchor=5")])
def test_stage_resume_is_exact(quick_chain, tmp_path, stage, extra):
    d = quick_chain
    args = [f"train_{stage}.py", "--quick", "--max_steps=4", "--save_every=100", "--eval_every=100"] + extra.format(d=d).split()
    if stage == "ode":
        args.append(f"--pairs_dir={d}/ode_pairs")
    r = run(args + [f"--out_dir={tmp_path}/full"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(args + [f"--out_dir={tmp_path}/cut", "--stop_after=2"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(args + [f"--out_dir={tmp_path}/cut", "--resume", "--eval_every=50"])  # a changed flag is named
    assert r.returncode == 0, r.stderr[-2000:]
    assert "differ from the saved run's: --eval_every=50 (saved run: 100)" in r.stdout + r.stderr
    a = common.load_checkpoint(f"{tmp_path}/full/{stage}")
    b = common.load_checkpoint(f"{tmp_path}/cut/{stage}")
    assert a["meta"]["step"] == b["meta"]["step"] == 4
    assert max((a["state"][k] - b["state"][k]).abs().max().item() for k in a["state"]) <= 1e-6


def test_infer_interactive_one_chunk_per_line(quick_chain, tmp_path):
    r = run(["infer.py", f"--ckpt={quick_chain}/ode", "--interactive", f"--out={tmp_path}/i.mp4"],
            stdin="w\nl*2\nnot-an-action\nd,a\n")
    assert r.returncode == 0, r.stderr[-2000:]
    streamed = [line for line in r.stdout.splitlines() if line.startswith("chunk ")]
    assert len(streamed) == 3 and "unknown action letter" in r.stderr
    rep = json.load(open(tmp_path / "i.json"))
    assert rep["chunks"] == 3 and rep["frames"] == 2 + 2 + 2  # chunk 2: frame 0 + 1 step, then 2 per line
    # the caption is cut as Phase 1 learnt it, through every stage and at inference (--text_len 0: the input's)
    assert [json.load(open(f"{quick_chain}/{s}.json"))["config"]["text_len"] for s in ("bidir", "ar", "ode")] == [8] * 3
    assert rep["settings"]["text_len"] == 8
    for ext in (".mp4", ".gif", "_path.png"):
        assert os.path.getsize(tmp_path / f"i{ext}") > 0


BAD_FILES = {
    "empty.json": "",
    "invalid.json": "{not json",
    "noframes.json": '{"convention": "opencv", "pose": "w2c"}',
    "nan.json": '{"convention": "opencv", "pose": "w2c", "frames": [{"K_norm": [0.8,0.8,0.5,0.5], "w2c": [[1,0,0,NaN],[0,1,0,0],[0,0,1,0],[0,0,0,1]]}]}',
    "badrow.json": '{"convention": "opencv", "pose": "w2c", "frames": [{"K_norm": [0.8,0.8,0.5,0.5], "w2c": [[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,1,1]]}]}',
    "short_k.json": '{"convention": "opencv", "pose": "w2c", "frames": [{"K_norm": [0.8,0.8], "w2c": [[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]]}]}',
    "bad.txt": "https://example.com/video\n0 0.5 0.5\n",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_infer_malformed_camera_file_exit_2(quick_chain, tmp_path, name):
    (tmp_path / name).write_text(BAD_FILES[name])
    r = run(["infer.py", f"--ckpt={quick_chain}/ode", f"--cameras={tmp_path / name}", f"--out={tmp_path}/x.mp4"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], r.stderr


def test_infer_long_camera_file_streams_in_flat_memory(quick_chain, tmp_path):
    rss = {}
    for n in (40, 400):
        path = tmp_path / f"long{n}.json"
        cameras.save_cameras(path, cameras.load_cameras(f"w*{n // 2 - 1},l*{n // 2}"))
        r = run(["infer.py", f"--ckpt={quick_chain}/ode", f"--cameras={path}", "--window=4", f"--out={tmp_path}/l{n}.mp4"])
        assert r.returncode == 0, r.stderr[-2000:]
        rep = json.load(open(tmp_path / f"l{n}.json"))
        assert rep["frames"] == n
        rss[n] = rep["peak_rss_mb"]
    assert rss[400] - rss[40] < 40, rss  # 10x the frames, no growth beyond noise


def test_infer_wan_layout_checkpoint_with_a_tiny_vae(tmp_path):
    torch.manual_seed(0)
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                          out_channels=4, text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2).save_pretrained(tmp_path / "wan")
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(tmp_path / "vae")
    save_file({"text": torch.randn(5, 16)}, tmp_path / "text.safetensors")
    r = run(["infer.py", f"--ckpt={tmp_path}/wan", f"--vae={tmp_path}/vae", f"--text_emb={tmp_path}/text.safetensors",
             "--actions=w*3", "--height=32", "--width=32", f"--out={tmp_path}/wan.mp4", "--image=" + str(png(tmp_path))])
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.load(open(tmp_path / "wan.json"))
    assert rep["frames"] == 4 and rep["chunks"] == 2


def png(tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / "first.png")
    return tmp_path / "first.png"


def test_infer_bf16_weights_give_nearly_the_fp32_video(tmp_path):
    """bf16 weights draw the fp32 video up to rounding: every generated frame at most half as far from it as the
    same model's video from other noise (--seed=1; the shipped dmd: 2.0-2.4 against 6.5-7.8 of 255), so the bound
    does not depend on which model is shipped."""
    import imageio.v2 as imageio
    import numpy as np
    videos = []
    for name, flags in (("fp32", []), ("bf16", ["--dtype=bf16"]), ("seed1", ["--seed=1"])):
        r = run(["infer.py", "--actions=w*3,l*2", *flags, f"--out={tmp_path}/{name}.mp4"])
        assert r.returncode == 0, r.stderr[-800:]
        videos.append(np.stack(imageio.mimread(tmp_path / f"{name}.gif")).astype(float))
    assert videos[0].shape == videos[1].shape == (6, 256, 256, 3)
    rounding = np.abs(videos[0] - videos[1]).mean(axis=(1, 2, 3))  # (6,) per frame, 0..255 scale
    other = np.abs(videos[0] - videos[2]).mean(axis=(1, 2, 3))
    assert rounding[0] == other[0] == 0  # frame 0 is the given image
    assert 0 < rounding.mean() < 3 and (rounding[1:] < other[1:] / 2).all(), (rounding, other)


def test_dmd_window_is_scored_given_the_true_or_its_own_first_frame():
    truth, window = torch.randn(2, 12, 16, 4, 4), torch.randn(2, 12, 8, 4, 4)  # a 16-frame clip, a window of 8
    for how in ("true", "own"):  # the window at the start: frame 0 is the given image either way
        assert torch.equal(train_dmd.window_first(truth, window, 0, how), truth[:, :, 0])
    assert torch.equal(train_dmd.window_first(truth, window, 6, "true"), truth[:, :, 6])
    assert torch.equal(train_dmd.window_first(truth, window, 6, "own"), window[:, :, 0])


def test_dmd_anchor_compares_the_colour_of_each_cell_not_its_detail():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(2, 12, 8, 8, 8, generator=g)  # (B, C, F, h, w)
    detail = torch.randn(2, 12, 8, 8, 8, generator=g)
    detail = detail - detail.mean(dim=(3, 4), keepdim=True)  # every frame's mean left as it was
    assert train_dmd.anchor_loss(truth + detail, truth).item() < 1e-12  # other detail, same colours: no loss
    shift = torch.linspace(-0.2, 0.2, 12).view(1, 12, 1, 1, 1)  # each channel's colour moved by its own amount
    assert abs(train_dmd.anchor_loss(truth + shift, truth).item() - shift.pow(2).mean().item()) < 1e-7
    # on a grid of 2 x 2 cells, detail that moves colour from the left half to the right one counts
    halves = torch.cat([torch.full((4,), -0.1), torch.full((4,), 0.1)]).view(1, 1, 1, 1, 8).expand_as(truth)
    assert train_dmd.anchor_loss(truth + halves, truth).item() < 1e-12
    assert abs(train_dmd.anchor_loss(truth + halves, truth, grid=2).item() - 0.01) < 1e-7


def test_dmd_anchor_on_shown_pixels_leaves_what_frame_0_cannot_tell_open():
    # --anchor_on=shown: the anchor regresses only the latent pixels where the true clip equals the same path
    # with the objects frame 0 does not show left out; a wrong colour there costs nothing
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(2, 12, 8, 8, 8, generator=g)  # (B, C, F, h, w)
    shown = truth.clone()
    shown[:, :, 4:, :, 6:] = 0.0  # an unseen object stands in the right quarter of frames 4..7
    known = train_dmd.known_pixels(truth, shown)  # (B, 1, F, h, w)
    assert known.shape == (2, 1, 8, 8, 8) and known.sum().item() == 2 * 8 * 64 - 2 * 4 * 16
    wrong = truth.clone()
    wrong[:, :, 4:, :, 6:] += 0.5  # the model draws something else where the object stands
    assert train_dmd.anchor_loss(wrong, truth, grid=2).item() > 0.01  # regressed on every pixel, it costs
    assert train_dmd.anchor_loss(wrong, truth, grid=2, known=known).item() < 1e-12  # on the known ones, nothing
    # on the known pixels it counts as before: a cell half unknown weighs its known half
    shift = truth + 0.1
    assert abs(train_dmd.anchor_loss(shift, truth, grid=1, known=torch.ones_like(known)).item() - 0.01) < 1e-7
    # frames 0..3: every cell 0.1 off; frames 4..7: the left cells 0.1, the right ones half known, 0.05
    assert abs(train_dmd.anchor_loss(shift, truth, grid=2, known=known).item() - (0.01 + (0.01 + 0.0025) / 2) / 2) < 1e-7


def test_dmd_window_start_is_chunk_aligned_uniform_or_the_first_window():
    starts = [train_dmd.window_start(seed, 32, 8, 2) for seed in range(2000)]  # 13 possible starts: 0, 2, .., 24
    assert set(starts) == set(range(0, 25, 2)) and starts == [train_dmd.window_start(s, 32, 8, 2) for s in range(2000)]
    assert abs(starts.count(0) / 2000 - 1 / 13) < 0.03
    assert all(train_dmd.window_start(s, 32, 8, 2, first_window=1.0) == 0 for s in range(50))
    mixed = [train_dmd.window_start(seed, 32, 8, 2, first_window=0.5) for seed in range(2000)]
    assert abs(mixed.count(0) / 2000 - (0.5 + 0.5 / 13)) < 0.04  # half the windows are the first
    assert all(m in (0, s) for m, s in zip(mixed, starts))  # otherwise the same draw as without it
    assert train_dmd.window_start(3, 8, 8, 2) == 0  # a rollout as long as the window: Self-Forcing


def test_dmd_long_rollout_carries_gradient_only_in_the_scored_window():
    student, b = tiny_net(chunk=2), batch(B=2, F=4)
    few = M.few_step_sigmas((1000, 750, 500, 250))
    cams = cameras.load_cameras("w*7")  # an 8-frame rollout, scored from frame 4 on
    cams = type(cams)(cams.w2c.expand(2, -1, -1, -1), cams.K.expand(2, -1, -1))
    noise = torch.randn(2, 12, 8, 8, 8, generator=torch.Generator().manual_seed(0))

    def grads(part, grad_from=4):  # the parameters' gradient of a loss on the frames `part` of a fresh rollout
        student.zero_grad()
        x = train_dmd.self_rollout(student, noise, b["text"], cams, b["x0"][:, :, 0], few, exit_step=1,
                                   generator=torch.Generator().manual_seed(1), grad_from=grad_from, sink=1, window=4)
        assert x.shape == (2, 12, 8, 8, 8)
        x[:, :, part].pow(2).mean().backward()
        return sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None)
    assert grads(slice(0, 4)) == 0  # the lead-in to the window ran without gradient
    assert grads(slice(4, 8)) > 0  # the window's chunks carry it through their exit step
    assert grads(slice(0, 4), grad_from=0) > 0  # --anchor_frames=rollout: the lead-in's exit steps carry it too
