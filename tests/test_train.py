"""Training stages: loss goes down, resume is exact, torchrun == one process, real loading path, bad flags."""

import pytest
import torch
from diffusers import WanTransformer3DModel

import common
import cameras
import data
import model as M

from helpers import run


def weights(stem, ema=False):
    ck = common.load_checkpoint(stem, load_opt=False)
    return ck["ema"] if ema else ck["state"]


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def tiny_batch(B=4, F=4, seed=0):
    cfg = type("C", (), dict(seed=seed, batch_size=B, frames=F, height=16, width=16, text_len=8, text_drop=0.0,
                             camera_noise=0.0, data=""))
    codec, source = data.training_source(cfg, M.make_config("tiny"))
    return source(0, 0, 1)


def test_flow_matching_loss_decreases_on_fixed_seed():
    torch.manual_seed(0)
    net = M.DiT(M.make_config("tiny", dim=64, ffn_dim=128, num_layers=2))
    b = tiny_batch()
    cond = M.image_cond(b["x0"][:, :, 0], 4)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = M.flow_matching_loss(net, b["x0"], b["noise"], sigma, b["text"], b["cameras"], cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_bidir_resume_is_exact(tmp_path):
    common_args = ["train_bidir.py", "--quick", "--max_steps=6", "--eval_every=100"]
    r = run(common_args + [f"--out_dir={tmp_path}/full"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(common_args + [f"--out_dir={tmp_path}/cut", "--stop_after=3"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert common.load_checkpoint(f"{tmp_path}/cut/bidir")["meta"]["step"] == 3
    r = run(common_args + [f"--out_dir={tmp_path}/cut", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    full, cut = weights(f"{tmp_path}/full/bidir"), weights(f"{tmp_path}/cut/bidir")
    assert max_diff(full, cut) <= 1e-6
    torch.manual_seed(0)  # and training did move the weights away from the seed-0 init
    assert max_diff(full, M.DiT(M.make_config("tiny")).state_dict()) > 1e-3


def test_torchrun_two_processes_take_the_same_first_step(tmp_path):
    args = ["train_bidir.py", "--quick", "--max_steps=1", "--batch_size=4", "--eval_every=100"]
    r1 = run(args + [f"--out_dir={tmp_path}/one"])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run(args + [f"--out_dir={tmp_path}/two"], torchrun=True)
    assert r2.returncode == 0, r2.stderr[-3000:]
    one, two = weights(f"{tmp_path}/one/bidir"), weights(f"{tmp_path}/two/bidir")
    assert max_diff(one, two) <= 1e-5


def test_bidir_from_a_wan_layout_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=12,
                                out_channels=12, text_dim=64, freq_dim=32, ffn_dim=48, num_layers=2)
    ref.save_pretrained(tmp_path / "wan")
    r = run(["train_bidir.py", "--quick", "--max_steps=2", f"--init={tmp_path}/wan", f"--out_dir={tmp_path}/o"])
    assert r.returncode == 0, r.stderr[-2000:]
    ck = common.load_checkpoint(f"{tmp_path}/o/bidir")
    assert ck["meta"]["model"]["prope"] == "branch" and ck["meta"]["model"]["image_cond"]
    assert ck["state"]["patch_embedding.weight"].shape[1] == 25  # widened for the first-frame condition
    assert "blocks.1.self_attn.prope_proj.weight" in ck["state"]


def test_bidir_continued_from_a_phase1_checkpoint_keeps_its_inline_prope(tmp_path):
    # Phase 1 continued (e.g. on longer clips) from the shipped tiny teacher: its inline PRoPE, which has no
    # parameters, must stay; a zero-initialized branch forced on top would silently drop the learnt cameras
    r = run(["train_bidir.py", "--quick", "--max_steps=2", "--init=assets/bidir", f"--out_dir={tmp_path}/o"])  # a stem, as --ckpt
    assert r.returncode == 0, r.stderr[-2000:]
    ck, init = common.load_checkpoint(f"{tmp_path}/o/bidir"), common.load_checkpoint("assets/bidir")
    assert ck["meta"]["model"]["prope"] == init["meta"]["model"]["prope"] == "inline"
    assert set(ck["state"]) == set(init["state"])  # no prope_proj.* added
    assert max_diff(ck["state"], init["state"]) < 0.05  # two small steps from the teacher, not a new model


@pytest.mark.parametrize("args,msg", [
    (["--max_step=3"], "unknown flag --max_step (did you mean --max_steps?)"),
    (["--max_steps=ten"], "--max_steps expects int"),
    (["--init=/nonexistent/wan.safetensors"], "not found"),
])
def test_bad_flags_one_line_exit_2(args, msg):
    r = run(["train_bidir.py", "--quick"] + args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], r.stderr


def test_bidir_trains_on_a_prepared_real_data_cache(tmp_path):
    from test_data import write_video
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        write_video(src / f"v{i}.mp4", frames=4, seed=i)
        cameras.save_cameras(src / f"v{i}.json", cameras.load_cameras("w*3" if i else "l*3"), width=64, height=48)
        (src / f"v{i}.caption.txt").write_text("a red sphere on green ground\n")
    assert data.prepare(src, tmp_path / "cache", frames=4, height=16, width=16, text_len=8, text_dim=64,
                        text_encoder="hash") == ["v0", "v1"]
    r = run(["train_bidir.py", "--quick", "--max_steps=2", f"--data={tmp_path}/cache", f"--out_dir={tmp_path}/o"])
    assert r.returncode == 0, r.stderr[-2000:]
    ck = common.load_checkpoint(f"{tmp_path}/o/bidir")
    assert ck["meta"]["step"] == 2 and ck["meta"]["config"]["data"] == f"{tmp_path}/cache"
