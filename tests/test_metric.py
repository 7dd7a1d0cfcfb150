"""metric.py: the control metric on synthetic models, the results table on fake logs, the comparison picture."""
import json
import os

import numpy as np
import pytest
import torch

import data
import metric
import world
from helpers import run


def clips_and_codec(n=3, frames=4, size=16):
    return metric.eval_clips(n, frames, size, size, 8, 4), data.PixelCodec(2)


def test_control_metric_perfect_static_and_mirrored_models():
    clips, codec = clips_and_codec()
    truth, other = codec.encode(clips["video"]), codec.encode(clips["other"])

    def perfect(noise, text, cams, first):  # knows both renderings: follows whichever path it is given
        mirrored = torch.equal(cams.w2c, clips["w2c_other"])
        return other if mirrored else truth

    static = lambda noise, text, cams, first: first[:, :, None].expand_as(noise)
    velocity = lambda x_t, s, text, cams, first, x0: torch.zeros_like(x_t)
    m = metric.control_metric(perfect, velocity, codec, clips)
    assert m["psnr"] > 90 and m["sharpness"] == pytest.approx(1.0)
    assert m["control_margin"] == pytest.approx(m["oracle_margin"]) and m["margin_ratio"] == pytest.approx(1.0)
    assert m["margin_wins"] == 1.0 and m["gain_static"] > 30
    s = metric.control_metric(static, velocity, codec, clips)
    assert s["gain_static"] == pytest.approx(0.0, abs=1e-4) and s["control_margin"] == pytest.approx(0.0, abs=1e-4)
    assert s["loss_gap@0.5"] == 0.0  # a camera-blind velocity has no loss gap


def test_results_table_reads_the_last_eval_of_each_model(tmp_path):
    ev = lambda psnr: dict(psnr=psnr, control_margin=1.0, margin_wins=0.75, oracle_margin=2.0, margin_ratio=0.5,
                           gain_static=0.3, sharpness=0.9, **{"loss_gap@0.5": 0.1, "loss_gap@0.9": 0.2})
    rows = [dict(step=0, model="bidir_as_ar", sampler="25 Euler steps / chunk, KV cache", eval=ev(15.0)),
            dict(step=10, loss=1.0, time=60.0), dict(step=20, loss=0.5, time=120.0),
            dict(step=20, model="ar", eval=ev(19.0)), dict(step=30, loss=0.4, time=30.0),  # resumed: clock restarts
            dict(step=30, model="ar", eval=ev(20.0))]
    (tmp_path / "ar.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = metric.results_table(str(tmp_path)).splitlines()
    assert len(table) == 4
    assert table[2].startswith("| ar: baseline bidir_as_ar | 25 Euler steps / chunk, KV cache | 0 | 2 min | 15.00 dB")
    assert table[3].startswith("| ar | 25 Euler / chunk, KV cache | 30 | 2 min | 20.00 dB | +1.00 dB (75%)")


def test_control_command_scores_a_checkpoint_as_its_training_run_logged(tmp_path):
    """metric.py control gives, from a checkpoint alone, the control metric its run logged at its last step
    (the same held-out clips, noise and sampler, the EMA weights): a Phase 1 run (whole clip), Stage 1 (many
    Euler steps through the cache) and Stage 2b (the few-step sampler)."""
    d = str(tmp_path)
    for args in (["train_bidir.py"], ["train_ar.py", f"--ckpt={d}/bidir"], ["train_cd.py", f"--ckpt={d}/ar"]):
        r = run(args + ["--quick", f"--out_dir={d}"])
        assert r.returncode == 0, r.stderr[-2000:]
    got = metric.control_report(metric.ControlConfig(ckpts=f"{d}/bidir,{d}/ar,{d}/cd", out=f"{d}/control"))
    for name in ("bidir", "ar", "cd"):
        logged = [json.loads(x) for x in open(f"{d}/{name}.metrics.jsonl") if '"eval"' in x]
        last = [x for x in logged if x.get("model", name) == name][-1]
        assert last["step"] == 6 and got[name]["sampler"] == last["sampler"]
        assert os.path.getsize(f"{d}/control_{name}_sample.gif") > 0
        for k, v in last["eval"].items():  # a nan (margin/oracle where the oracle margin is not positive) is logged null
            assert got[name]["eval"][k] == pytest.approx(float("nan") if v is None else v, rel=1e-5, abs=1e-6,
                                                         nan_ok=True), (name, k)
    rows = open(f"{d}/control.md").read().splitlines()
    assert [r.split(" | ")[:3] for r in rows[2:]] == [["| bidir", "3 Euler, whole clip", "6"],
                                                      ["| ar", "3 Euler steps / chunk, KV cache", "6"],
                                                      ["| cd", "4 renoise steps / chunk, KV cache", "6"]]


def test_compare_png_shows_the_truth_then_each_checkpoint(tmp_path):
    from PIL import Image
    path = str(tmp_path / "cmp.png")
    metric.compare_samples(path, ["assets/cd", "assets/cd", "assets/dmd"], clips=1, scale=2)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    h = 32 * 2
    assert img.shape == (4 * h, 60 + 7 * h, 3)  # truth + 3 rows, frames 1..7
    truth, cd1, cd2, dmd = (img[i * h:(i + 1) * h, 60:] for i in range(4))
    assert np.array_equal(cd1, cd2)  # fixed noise: the same checkpoint draws the same row
    assert not np.array_equal(cd1, dmd) and not np.array_equal(cd1, truth)
    video = metric.eval_clips(1, 8, 32, 32, 64, 16)["video"][0]  # (3, F, H, W) in [-1, 1]
    frame1 = ((video[:, 1] + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 0).numpy().astype(int)
    assert np.array_equal(truth[::2, :32 * 2:2][:, :32], frame1)  # nearest upscale of the true frame 1


def test_long_rollout_metric_perfect_model_scores_the_truth_frozen_frame_the_static_copy():
    clips, codec = metric.long_clips(3, 40, 16, 16, 8, 4), data.PixelCodec(2)
    truth = codec.encode(clips["video"])
    perfect = metric.long_rollout_metric(lambda noise, text, cams, first: truth, codec, clips)
    frozen = metric.long_rollout_metric(lambda noise, text, cams, first: first[:, :, None].expand_as(noise),
                                        codec, clips, batch=2)
    assert (perfect["model"]["psnr"] > 90).all() and perfect["model"]["colour"].abs().max() < 1e-6
    paths = frozen["per_path"]["model"]["colour"]  # (3, 40): each path's own, and their mean is the row
    assert paths.shape == (3, 40) and torch.allclose(paths.mean(0), frozen["model"]["colour"])
    assert not torch.allclose(paths[0], paths[1])  # two paths, two scores
    assert torch.allclose(frozen["per_path"]["static"]["psnr"], frozen["per_path"]["model"]["psnr"])  # path by path
    assert torch.allclose(perfect["model"]["sharp"], perfect["model"]["sharp_true"])
    for key in ("psnr", "colour", "sharp"):  # the frozen frame is exactly the static copy
        assert torch.allclose(frozen["model"][key], frozen["static"][key])
    segments = metric.segment_scores(frozen["model"])
    assert list(segments) == ["1-7", "8-15", "16-31"]  # segments that fit in 40 frames
    assert segments["16-31"]["psnr"] == pytest.approx(frozen["model"]["psnr"][16:32].mean().item())
    assert frozen["model"]["colour"][1:].mean() > 0.005  # the world changes as the camera moves
    redrawn = perfect["redrawn"]  # the truth with what frame 0 does not show re-drawn: exact at frame 0 only
    assert redrawn["psnr"][0] > 90 and redrawn["psnr"][1:].min() < 90 and torch.equal(redrawn["psnr"], frozen["redrawn"]["psnr"])
    shown = perfect["shown"]  # ... and with it left out: exact at frame 0, an object missing later
    assert shown["psnr"][0] > 90 and shown["psnr"][1:].min() < 90 and torch.equal(shown["colour"], frozen["shown"]["colour"])
    table = metric.long_table({"perfect": perfect["model"], "static": frozen["static"]}).splitlines()
    assert table[0] == "| model | frames 1-7 | frames 8-15 | frames 16-31 |" and table[3].startswith("| static | ")
    assert table[2].startswith("| perfect | > 40 / 0.000 / 1.00 |")


def test_long_report_draws_average_noise_draws_and_draw_0_is_the_one_draw_run(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    metric.long_report(metric.LongConfig(ckpts="assets/cd", clips=1, frames=8, out=one))
    metric.long_report(metric.LongConfig(ckpts="assets/cd", clips=1, frames=8, draws=2, out=two))
    runs = [json.load(open(p + ".json")) for p in (one, two)]
    draws = runs[1]["per_draw_segments"]["cd"]
    assert len(draws) == 2 and draws[0] == runs[0]["per_draw_segments"]["cd"][0]  # draw 0 is the one-draw run
    assert draws[0]["1-7"]["colour"] != draws[1]["1-7"]["colour"]  # the second draw is another noise
    colour = np.mean(runs[1]["per_frame"]["cd"]["colour"][1:8])
    assert colour == pytest.approx((draws[0]["1-7"]["colour"] + draws[1]["1-7"]["colour"]) / 2, abs=1e-6)
    assert runs[1]["per_path_segments"]["cd"]["0"]["1-7"]["colour"] == pytest.approx(colour, abs=1e-6)  # 1 path
    static = np.mean(runs[1]["per_frame"][metric.STATIC_ROW]["colour"][1:8])  # and the baselines', path by path
    assert runs[1]["per_path_segments"][metric.STATIC_ROW]["0"]["1-7"]["colour"] == pytest.approx(static, abs=1e-6)
    row = [r for r in open(two + ".md").read().splitlines() if r.startswith("| cd |")][0]
    assert row.split(" | ")[1].split(" / ")[1] == f"{colour:.3f}"
    from PIL import Image  # the picture: truth, then the model, at frames long_picks(8) = 0 and 7
    assert metric.long_picks(8) == [0, 7] and metric.long_picks(512)[4:7] == [64, 128, 192]
    assert metric.long_picks(512)[-2:] == [448, 511] and len(metric.long_picks(512)) == 12
    png = np.asarray(Image.open(one + "_frames.png").convert("RGB")).astype(int)
    assert png.shape == (2 * 96, 60 + 2 * 96, 3)  # 1 path x (truth, cd) rows of 32 px x 3; 2 frames after the names
    truth = metric.long_clips(1, 8, 32, 32, 64, 16)["video"][0]  # (3, F, H, W)
    frame7 = ((truth[:, 7] + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 0).numpy().astype(int)
    assert np.array_equal(png[:96:3, 60 + 96::3], frame7)  # the truth's row, second column: frame 7
    assert not np.array_equal(png[96::3, 60 + 96::3], frame7)  # the model's row is its own rollout


def test_long_report_scores_a_phase1_teacher_on_its_whole_clip_from_the_given_frame(tmp_path):
    """A Phase 1 checkpoint is not streamed: it samples its whole clip at once (--steps Euler steps), frame 0 the
    given image's latent, as the AR rows' first chunk has it; its row beside theirs is the teacher's own drawing."""
    import model as M
    from prope import Cameras
    out = str(tmp_path / "t")
    metric.long_report(metric.LongConfig(ckpts="assets/bidir", clips=1, frames=8, steps=2, out=out))
    got = json.load(open(out + ".json"))["per_frame"]["bidir"]
    clips, codec = metric.long_clips(1, 8, 32, 32, 64, 16), data.PixelCodec(2)
    x0 = codec.encode(clips["video"][:, :, :1])  # (1, C, 1, h, w)
    noise = torch.randn((1, x0.shape[1], 8, *x0.shape[-2:]), generator=torch.Generator().manual_seed(0))
    net, cond = M.load_pretrained("assets/bidir").eval(), M.image_cond(x0[:, :, 0], 8)
    with torch.no_grad():
        lat = M.sample_bidir(net, noise, clips["text"], Cameras(clips["w2c"], clips["K"]), cond, M.euler_sigmas(2))
    own = metric.frame_scores(codec.decode(lat).clamp(-1, 1), clips["video"])
    assert got["psnr"][0] > 90 and own["psnr"][0] < 60  # frame 0 is the given image, not the teacher's redrawing
    assert np.allclose(got["colour"][1:], own["colour"][1:].numpy(), atol=1e-6)  # the rest: the 2-step whole clip
    assert np.allclose(got["psnr"][1:], own["psnr"][1:].numpy(), atol=1e-4)


def test_long_report_two_runs_checkpoints_of_one_name_get_a_row_each(tmp_path):
    import shutil
    for run in ("a", "b"):  # two runs' checkpoints named alike, as every run names its own
        (tmp_path / run).mkdir()
        for ext in (".json", ".safetensors"):
            shutil.copy("assets/cd" + ext, tmp_path / run / ("dmd" + ext))
    out, a, b = str(tmp_path / "long"), str(tmp_path / "a" / "dmd"), str(tmp_path / "b" / "dmd")
    metric.long_report(metric.LongConfig(ckpts=f"{a},{b},assets/ode", clips=1, frames=8, out=out))
    rows = [r.split(" | ")[0][2:] for r in open(out + ".md").read().splitlines()[2:]]
    assert rows[:3] == [a, b, "ode"]  # (was one row "dmd", the second run's, the first silently dropped)
    table = open(out + ".md").read().splitlines()
    assert table[2].split(" | ")[1:] == table[3].split(" | ")[1:]  # the same weights score the same


def test_still_metric_a_still_world_scores_zero_flicker_a_blinking_one_its_step():
    clips = metric.still_clips(2, 6, 16, 16, 8, 4)
    long = metric.long_clips(2, 6, 16, 16, 8, 4)
    assert torch.equal(clips["first"], long["video"][:, :, 0])  # the long scenes' frame 0, from the start pose
    later, three = metric.long_clips(2, 6, 16, 16, 8, 4, first=1), metric.long_clips(3, 6, 16, 16, 8, 4)
    for k in ("video", "w2c", "text", "shown"):  # --first_clip: the same paths as a longer set's tail
        assert torch.equal(later[k], three[k][1:])
    assert not torch.equal(later["video"][0], three["video"][0])
    assert torch.equal(metric.still_clips(1, 6, 16, 16, 8, 4, first=1)["first"], later["video"][:1, :, 0])
    assert clips["w2c"].shape == (2, 6, 4, 4) and torch.equal(clips["w2c"], clips["w2c"][:, :1].expand_as(clips["w2c"]))
    held = clips["first"][:, :, None].expand(-1, -1, 6, -1, -1)  # (B, 3, F, H, W): the truth, every frame frame 0
    still = metric.still_scores(held, clips["first"])
    assert (still["psnr"] > 90).all() and still["flicker"].abs().max() == 0
    step = 4 / 127.5  # a picture that moves by 4/255 every other frame: flicker 4 from frame 1 on
    blink = held + step * (torch.arange(6) % 2).view(1, 1, 6, 1, 1)
    flicker = metric.still_scores(blink, clips["first"])["flicker"]
    assert flicker[0] == 0 and torch.allclose(flicker[1:], torch.full((5,), 4.0), atol=1e-4)


def test_reveal_metric_a_model_that_draws_the_object_scores_the_truth_one_that_invents_nothing_the_bare_world():
    clips = metric.reveal_clips(3, 8, 32, 32, 8, 32)
    assert [p[0] for p in world.reveal_heldout_paths(3, 8, width=32, height=32)] == \
        [p[0] for p in world.reveal_heldout_paths(3, 8, width=32, height=32)]  # fixed
    assert min(p[0] for p in world.reveal_heldout_paths(3, 8)) >= world.EVAL_SEED_BASE  # held out
    assert torch.equal(clips["video"][:, :, 0], clips["shown"][:, :, 0])  # frame 0 does not show it
    truth, bare = metric.reveal_scores(clips["video"], clips), metric.reveal_scores(clips["shown"], clips)
    assert 0.01 < truth["pixels"] < 0.2  # the object enters: part of the frames, not all
    assert truth["to_truth"] == 0 and truth["colour"] == 0 and truth["to_shown"] == bare["to_truth"] > 0.2
    assert bare["to_shown"] == 0 and bare["colour"] > 0
    # the caption variants: only the object colours change (purple), or nothing is said (zeros)
    assert not torch.equal(clips["text_true"], clips["text_purple"]) and clips["text_none"].abs().max() == 0


def test_long_metric_streams_under_another_caption_where_told(tmp_path):
    seed = world.long_heldout_path(0, 8)[0]
    true, purple, none = (metric.caption_text(seed, c, 8, 32) for c in metric.REVEAL_CAPTIONS)
    words = world.caption(seed).split()[:32]
    colour = torch.tensor([w in world.OBJECT_COLOURS for w in words] + [False] * (32 - len(words)))
    named = torch.tensor([w in world.OBJECT_COLOURS and w != "purple" for w in words] + [False] * (32 - len(words)))
    assert colour.sum() >= 4 and named.any()  # a colour word for each of the scene's objects (4-7); the ground's kept
    assert torch.equal(purple[~named], true[~named]) and (purple[named] != true[named]).any(-1).all()
    at = colour.nonzero()[:, 0]  # every object now has the token "purple" at its place
    assert torch.allclose(purple[at], torch.stack([world.text_embedding(" ".join(["x"] * i + ["purple"]), 8, 32)[i]
                                                   for i in at.tolist()]))
    assert none.abs().max() == 0 and torch.equal(metric.long_clips(1, 8, 16, 16, 8, 32)["text"][0], true)
    assert torch.equal(metric.long_clips(1, 8, 16, 16, 8, 32, caption="purple")["text"][0], purple)
    tables = []
    for caption in ("true", "none"):  # the shipped model reads its caption: the row is named, and it draws otherwise
        out = str(tmp_path / caption)
        metric.long_report(metric.LongConfig(ckpts="assets/cd", clips=1, frames=8, caption=caption, out=out))
        tables.append(open(out + ".md").read().splitlines()[2].split(" | "))
    assert tables[0][0] == "| cd" and tables[1][0] == "| cd, no caption" and tables[0][1:] != tables[1][1:]


def test_reveal_report_table_and_picture(tmp_path):
    from PIL import Image
    out = str(tmp_path / "reveal")
    metric.reveal_report(metric.RevealConfig(ckpts="assets/bidir,assets/cd", clips=1, steps=2, out=out))
    rows = [r for r in open(out + ".md").read().splitlines() if r.startswith("| assets/") or r.startswith("| the world")]
    assert [r.split(" | ")[:2] for r in rows[:6]] == [[f"| assets/{m}", c] for m in ("bidir", "cd") for c in metric.REVEAL_CAPTIONS]
    clips = metric.reveal_clips(1, 8, 32, 32, 64, 16)
    bare = metric.reveal_scores(clips["shown"], clips)
    assert rows[6] == f"| the world without it (invents nothing) | – | {bare['to_truth']:.3f} / 0 | {bare['colour']:.4f} |"
    img = np.asarray(Image.open(out + ".png").convert("RGB"))
    assert img.shape[0] == 3 * 32 * 2  # one clip: the truth, then the two models (2x)


def test_ablation_tables_from_fake_runs(tmp_path):
    ev = lambda margin: dict(psnr=20.0 + margin, control_margin=margin, margin_wins=0.5 + margin / 10,
                             oracle_margin=2.0, margin_ratio=margin / 2, gain_static=margin, sharpness=0.9,
                             **{"loss_gap@0.5": margin / 10, "loss_gap@0.9": margin / 5})

    def fake_run(name, noise=0.0, drift=0.0, margins=(0.0, 1.0, 2.0), every=1000):
        d = tmp_path / name
        d.mkdir()
        (d / "bidir.json").write_text(json.dumps({"config": {"camera_noise": noise, "camera_scale_drift": drift}}))
        rows = []
        for i, m in enumerate(margins, 1):
            rows += [dict(step=i * every, loss=0.1, time=60.0 * i), dict(step=i * every, model="bidir", eval=ev(m))]
        (d / "bidir.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake_run("cam_exact")
    fake_run("cam_high", 0.08, 0.3, margins=(0.0, 0.1, 0.2))
    fake_run("cam_low", 0.01, 0.05, margins=(0.0, 0.5, 1.5))
    fake_run("batch_samples_2", margins=(0.0, 0.5), every=9000)
    fake_run("batch_updates_16", margins=(0.0, 3.0))
    fake_run("batch_updates_8", margins=())  # started, not yet evaluated: left out
    (tmp_path / "bench.json").write_text(json.dumps(dict(device="cpu", preset="tiny", first_chunk_s=0.05,
                                                         ar_25step_first_chunk_s=0.25, bidir_50step_s=1.0)))
    text = metric.ablation_tables(str(tmp_path))
    lines = text.splitlines()
    assert "| exact | 3000 | 3 min | +2.00 dB (70%) | +2.00 dB | 100% | +20% / +40% | +2.00 dB | 22.00 dB | 0.90 |" in lines
    assert any(line.startswith("| 0.08 rad / 0.08 m, drift 0.3 | 3000 | 3 min | +0.20 dB") for line in lines)
    order = [line.split(" | ")[0] for line in lines if line.startswith(("| exact |", "| 0.0"))]
    assert order == ["| exact", "| 0.01 rad / 0.01 m, drift 0.05", "| 0.08 rad / 0.08 m, drift 0.3"]  # by level
    curve = [line for line in lines if line.startswith("| exact poses |")]
    assert [line.split(" | ")[1] for line in curve] == ["1000", "2000", "3000"]  # the control curve, step by step
    assert lines.index([x for x in lines if x.startswith("| 2, equal samples")][0]) < \
        lines.index([x for x in lines if x.startswith("| 16, equal updates")][0])
    assert "| 2, equal samples | 9000: +0.00 (50%) | 18000: +0.50 (55%) |" in lines  # control along each batch run
    assert "| 16, equal updates | 1000: +0.00 (50%) | 2000: +3.00 (80%) |" in lines
    assert not any(line.startswith("| 8, equal updates") for line in lines)
    assert "| AR, 4 steps, first chunk (KV cache) | 50 ms | x20 |" in lines
    assert "| AR, 25 Euler steps, first chunk (KV cache) | 250 ms | x4 |" in lines
    assert "Through the stages" not in text  # no chain/ folder: no such table
    # the full mode's run time: the five evaluated runs' logged minutes (3 + 3 + 3 + 2 + 2), not the copy of batch 4
    fake_run("batch_samples_4")  # ablate.sh's copy of cam_exact: not counted again
    assert "5 Phase 1 runs: 0.2 h of wall time summed; no chain yet; in all 0.2 h" in metric.ablation_tables(str(tmp_path))
    (tmp_path / "chain").mkdir()
    (tmp_path / "chain" / "time.txt").write_text("pipeline.sh: 47 minutes (2 invocations, --resume)\n")
    assert "; the chain (chain/time.txt): 47 min; in all 1.0 h" in metric.ablation_tables(str(tmp_path))


def test_long_rollout_metric_context_oracles_hand_the_rendering_to_the_cache(tmp_path):
    """--context=truth / shown: the sampler is given the exact rendering's latents (or frame 0's objects only) to
    commit; a model that plays back what its cache is given then scores the truth (or the shown baseline)."""
    clips, codec = metric.long_clips(2, 16, 16, 16, 8, 4), data.PixelCodec(2)
    playback = lambda noise, text, cams, first, commit_frames=None: noise if commit_frames is None else commit_frames
    truth = metric.long_rollout_metric(playback, codec, clips, context="truth")
    shown = metric.long_rollout_metric(playback, codec, clips, context="shown")
    own = metric.long_rollout_metric(playback, codec, clips)
    assert (truth["model"]["psnr"] > 90).all() and truth["model"]["colour"].abs().max() < 1e-6
    assert torch.allclose(shown["model"]["colour"], shown["shown"]["colour"], atol=1e-6)
    assert torch.allclose(shown["model"]["psnr"], shown["shown"]["psnr"], atol=1e-3)
    assert (own["model"]["psnr"] < 20).all()  # its own "frames" (noise) are far from the world
    # --paste_unseen: the truth pasted where an object frame 0 does not show stands, the model's frames elsewhere
    pasted = metric.long_rollout_metric(playback, codec, clips, context="shown", paste=True)
    unseen = (clips["video"] - clips["shown"]).abs().amax(1) > metric.UNSEEN_GAP  # (N, F, H, W)
    assert unseen[:, 0].sum() == 0 and unseen.float().mean() > 0.01  # none in frame 0; these paths meet some
    assert torch.equal(pasted["shown"]["colour"], shown["shown"]["colour"]) and "pasted" not in shown
    gain = shown["model"]["colour"] - pasted["pasted"]["colour"]  # the invent-nothing playback, objects pasted in
    assert gain.min() > -1e-6 and gain.max() > 0.01  # closer to the truth wherever an object stands
    assert pasted["pasted"]["colour"].max() < metric.UNSEEN_GAP / 2 + 1e-6  # what is left differs by < 0.1 a pixel
    perfect = metric.long_rollout_metric(playback, codec, clips, context="truth", paste=True)
    assert torch.equal(perfect["pasted"]["psnr"], perfect["model"]["psnr"])  # nothing to paste into the truth
    assert torch.allclose(pasted["per_path"]["pasted"]["colour"].mean(0), pasted["pasted"]["colour"])
    out, plain = str(tmp_path / "long"), str(tmp_path / "plain")  # a row streamed otherwise than infer.py says how
    metric.long_report(metric.LongConfig(ckpts="assets/cd", clips=1, frames=8, context="shown", context_sigma=0,
                                         timesteps=(1000, 500), out=out))
    metric.long_report(metric.LongConfig(ckpts="assets/cd", clips=1, frames=8, context="shown", context_sigma=0, out=plain))
    metric.long_report(metric.LongConfig(ckpts="assets/cd", clips=1, frames=8, paste_unseen=True,
                                         out=str(tmp_path / "p")))
    rows = [r.split(" | ")[0] for r in open(str(tmp_path / "p") + ".md").read().splitlines()[2:]]
    assert rows[:2] == ["| cd", "| cd, unseen objects pasted"]  # a row beside each model's
    assert "cd, unseen objects pasted" in json.load(open(str(tmp_path / "p") + ".json"))["per_path_segments"]
    row, plain_row = (open(p + ".md").read().splitlines()[2].split(" | ") for p in (out, plain))
    assert row[0] == "| cd, shown context, commit σ 0, timesteps 1000,500" and plain_row[0] == "| cd, shown context, commit σ 0"
    assert row[1:] != plain_row[1:]  # the two timesteps draw other frames
    still = str(tmp_path / "still")  # metric.py still names its rows alike
    metric.still_report(metric.StillConfig(ckpts="assets/cd", clips=1, frames=8, context_sigma=0.5, out=still))
    assert open(still + ".md").read().splitlines()[2].startswith("| cd, commit σ 0.5 | ")
