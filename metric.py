"""How minWM measures a model: the control metric shared by every stage, and its tables and pictures.

The control metric asks "does the model go where the cameras say?". On held-out scenes x paths of
the procedural world (`eval_clips`; scene seeds >= 10**9, never trained on), every stage is
measured the same way, each with its own sampler (`metric_fns`):
  psnr            generated frames 1.. vs the true rendering along the same path (frame 0 is given)
  gain_static     psnr - psnr of a static copy of frame 0
  control_margin  psnr - psnr of the same model fed the mirrored path (scored against the true path);
                  margin_wins: the share of clips where the true path scores higher
  oracle_margin   psnr - psnr of the TRUE rendering along the mirrored path: the margin this model
                  would have if it followed the mirrored cameras perfectly; margin_ratio =
                  control_margin / oracle_margin. It contains the model's own psnr, so it differs
                  between models on the same clips: compare margin_ratio across stages
  loss_gap@s      flow-matching loss with mirrored vs true cameras at fixed sigma s and fixed noise,
                  relative ((L_mirror - L_true) / L_true): fast and sensitive, usable while training
  sharpness       image-gradient energy of generated frames / the truth's (1.0 = as sharp): PSNR
                  rewards blur, so every PSNR is read beside it

`report` runs it during training (log line, OUT_DIR/NAME.metrics.jsonl, a gif of generated | truth).

    python metric.py table OUT_DIR                  # the results table of every stage in OUT_DIR
    python metric.py plot OUT_DIR NAME              # the control metric along training (PNG)
    python metric.py compare OUT.png CKPT [CKPT...] # held-out frames: the truth, then each checkpoint
    python metric.py long --ckpts=assets/ar,assets/dmd --frames=512   # long rollouts vs the exact truth
    python metric.py ablation OUT_DIR               # ablate.sh's five tables -> OUT_DIR/ablation.md

The long-rollout metric asks "does the world hold together?": on long held-out paths
(`world.long_heldout_path`: hundreds of latent frames wandering around the scene from its start pose),
the model streams chunk by chunk from frame 0 alone, as infer.py does, and every frame is scored
against the exact rendering: PSNR, mean-colour error and sharpness, by frame and by segment
(LONG_SEGMENTS), beside three baselines: a static copy of frame 0 (a world that does not move), the world
with only frame 0's objects (a perfect model that invents nothing), and the re-drawn world (the same path
through the same scene with the objects frame 0 does not show put at other places the scene's prior allows,
`world.redraw_unseen`: what a perfect world model scores, since frame 0 and the caption cannot tell it
where those objects are).

    python metric.py still --ckpts=assets/cd,assets/dmd --frames=64   # a camera that stands still
    python metric.py reveal --ckpts=assets/bidir,assets/dmd           # an object only the caption names

The still-camera metric asks "does a world that does not move stay still?": the camera stands at each long
held-out scene's start pose, so every true frame is frame 0; it scores PSNR against frame 0 (drift) and
flicker, the mean change of a pixel from the previous frame (in 1/255; the truth's is 0).

The reveal metric asks "does the model draw what only the caption names?": on held-out paths that turn
until an object frame 0 does not show stands in the view (`world.reveal_heldout_paths`), each model
generates the clip from frame 0 under the true caption, one with every object named purple, and none; on
the object's pixels its frames are compared with the truth and with the same world without the object.
"""
import dataclasses
import functools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import common
import data
import model as M
import world
from cameras import load_cameras, mirror_cameras
from prope import Cameras


# ----------------------------------------------------------------------------------------------
# the control metric

def psnr(a, b):
    """Per-clip PSNR over all given frames; a, b (B, 3, F, H, W) in [-1, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def sharpness(x):
    """Mean squared image gradient (x and y) per clip; x (B, 3, F, H, W)."""
    gx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).flatten(1).mean(1)
    gy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1).mean(1)
    return gx + gy


def eval_clips(n, frames, height, width, text_dim, text_len, seed=0):
    """n fixed held-out clips: video, the true rendering along the mirrored path, both paths' cameras, text."""
    out = {"video": [], "other": [], "w2c": [], "w2c_other": [], "K": [], "text": []}
    for i in range(n):
        scene_seed, _, cams = world.heldout_path(i, frames, seed, width, height)
        other = mirror_cameras(cams)
        out["video"].append(world.render_world(scene_seed, cams, height, width))
        out["other"].append(world.render_world(scene_seed, other, height, width))
        out["w2c"].append(cams.w2c[0])
        out["w2c_other"].append(other.w2c[0])
        out["K"].append(cams.K[0])
        out["text"].append(world.text_embedding(world.caption(scene_seed), text_dim, text_len))
    return {k: torch.stack(v) for k, v in out.items()}


def stage_clips(cfg, model_cfg, rank):
    """A training stage's held-out clips (its frames, size and text length), or None where nothing is
    measured: on ranks other than 0, on real data (no exact truth to compare with), and under --fsdp (the
    metric runs on rank 0 alone, and a sharded model's forward needs every rank: measure the checkpoint)."""
    if rank != 0 or cfg.data or getattr(cfg, "fsdp", False):
        return None
    return eval_clips(cfg.eval_clips, cfg.eval_frames or cfg.frames, cfg.height, cfg.width, model_cfg.text_dim,
                      cfg.text_len)  # common.start resolved 0 to the input checkpoint's


def metric_fns(net, mode, sigmas, renoise=False):
    """(sample, velocity) callables for control_metric, so every stage is measured the same way.

    mode "bidir": whole-clip Euler sampling, bidirectional velocity; mode "ar": chunked rollout through
    the KV cache (renoise=True for the few-step sampler), teacher-forcing velocity (clean = x0).
    """
    def sample(noise, text, cams, first):
        cond = M.image_cond(first, noise.shape[2])
        if mode == "bidir":
            return M.sample_bidir(net, noise, text, cams, cond, sigmas)
        return M.sample_ar(net, noise, text, cams, cond, sigmas, renoise=renoise,
                           generator=torch.Generator(noise.device).manual_seed(0))

    @torch.no_grad()
    def velocity(x_t, s, text, cams, first, x0):
        t = torch.full(x_t.shape[:1], 1000.0 * s, device=x_t.device)
        cond = M.image_cond(first, x_t.shape[2])
        return net(x_t, t, text, cams, cond) if mode == "bidir" else net(x_t, t, text, cams, cond, clean=x0)

    return sample, velocity



@torch.no_grad()
def control_metric(sample, velocity, codec, clips, loss_sigmas=(0.5, 0.9), batch=16, seed=0, device="cpu",
                   gif_path=None):
    """Measure camera control; the module docstring defines every number returned.

    sample(noise, text, cameras, first) -> latents (B, C, F, h, w), with first = clean latent frame 0
    velocity(x_t, sigma, text, cameras, first, x0) -> v  (x0 lets AR models use teacher forcing)
    clips: from eval_clips(). Noise is fixed by `seed`, so numbers are comparable across stages.
    gif_path: also write the first clips as a gif, generated | truth, one clip per row.
    """
    n = clips["video"].shape[0]
    rows = {k: [] for k in ("psnr", "psnr_static", "psnr_other", "psnr_oracle", "sharp", "sharp_true",
                            *[f"loss@{s}" for s in loss_sigmas], *[f"loss_other@{s}" for s in loss_sigmas])}
    generator = torch.Generator().manual_seed(seed)
    tail = lambda v: v[:, :, 1:]  # frame 0 is given: score frames 1..
    for i in range(0, n, batch):
        sl = slice(i, min(i + batch, n))
        video, other = clips["video"][sl].to(device), clips["other"][sl].to(device)  # (B, 3, F, H, W)
        text = clips["text"][sl].to(device)
        cams = Cameras(clips["w2c"][sl], clips["K"][sl]).to(device)
        cams_o = Cameras(clips["w2c_other"][sl], clips["K"][sl]).to(device)
        x0 = codec.encode(video)  # (B, C, F, h, w)
        first = x0[:, :, 0]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        gen_true = codec.decode(sample(noise, text, cams, first)).clamp(-1, 1)
        gen_other = codec.decode(sample(noise, text, cams_o, first)).clamp(-1, 1)
        static = video[:, :, :1].expand_as(video)
        if gif_path and i == 0:
            data.save_video(gif_path, torch.cat([torch.cat([g, t], -1) for g, t in zip(gen_true[:4], video[:4])], -2))
        rows["psnr"].append(psnr(tail(gen_true), tail(video)))
        rows["psnr_static"].append(psnr(tail(static), tail(video)))
        rows["psnr_other"].append(psnr(tail(gen_other), tail(video)))
        rows["psnr_oracle"].append(psnr(tail(other), tail(video)))
        rows["sharp"].append(sharpness(tail(gen_true)))
        rows["sharp_true"].append(sharpness(tail(video)))
        for s in loss_sigmas:
            x_t = M.add_noise(x0, noise, s)
            for key, c in ((f"loss@{s}", cams), (f"loss_other@{s}", cams_o)):
                v = velocity(x_t, s, text, c, first, x0)
                rows[key].append((v - (noise - x0)).pow(2).flatten(1).mean(1))
    r = {k: torch.cat(v).cpu() for k, v in rows.items()}
    out = dict(
        clips=n, psnr=r["psnr"].mean().item(),
        gain_static=(r["psnr"] - r["psnr_static"]).mean().item(),
        control_margin=(r["psnr"] - r["psnr_other"]).mean().item(),
        margin_wins=(r["psnr"] > r["psnr_other"]).float().mean().item(),
        oracle_margin=(r["psnr"] - r["psnr_oracle"]).mean().item(),
        sharpness=(r["sharp"].mean() / r["sharp_true"].mean()).item(),
    )
    out["margin_ratio"] = out["control_margin"] / out["oracle_margin"] if out["oracle_margin"] > 0 else float("nan")
    for s in loss_sigmas:
        lt, lo = r[f"loss@{s}"].mean().item(), r[f"loss_other@{s}"].mean().item()
        out[f"loss_gap@{s}"] = (lo - lt) / lt
    return out


def report(cfg, clips, codec, step, net, mode, sigmas, renoise=False, label=None, device="cpu"):
    """The control metric of `net` during training: one log line, a row in OUT_DIR/NAME.metrics.jsonl
    (with `model`: label, for baselines measured beside the stage's own model) and OUT_DIR/LABEL_sample.gif.
    Does nothing where clips is None (see stage_clips); returns the metric."""
    if clips is None:
        return None
    label = label or cfg.name
    steps = len(sigmas) - 1
    sampler = (f"{steps} Euler, whole clip" if mode == "bidir" else
               f"{steps} {'renoise' if renoise else 'Euler'} steps / chunk, KV cache")
    m = control_metric(*metric_fns(net, mode, sigmas, renoise), codec, clips, device=device,
                       gif_path=os.path.join(cfg.out_dir, f"{label}_sample.gif"))
    common.log(f"step {step} {label}: {format_metric(m)}")
    common.log_metrics(cfg.out_dir, cfg.name, dict(step=step, model=label, sampler=sampler, eval=m))
    return m


def report_teacher_baselines(cfg, clips, codec, teacher, few, device="cpu"):
    """Stage 2's step-0 baselines a student must beat: the AR teacher at the students' few steps, with the
    students' sampler (x0, then fresh noise: `teacher_4step`) and with its own PF-ODE (Euler:
    `teacher_4step_euler`). Both blur (see sharpness): the students' target is the many-step sample."""
    metric_args = (cfg, clips, codec, 0, teacher, "ar", few)
    report(*metric_args, renoise=True, label="teacher_4step", device=device)
    report(*metric_args, label="teacher_4step_euler", device=device)


def format_metric(m):
    """One line for logs and README tables."""
    gaps = " ".join(f"gap@{k[9:]}={v:+.1%}" for k, v in m.items() if k.startswith("loss_gap@"))
    return (f"psnr {m['psnr']:.2f} dB | margin {m['control_margin']:+.2f} dB ({m['margin_wins']:.0%} clips, "
            f"{m['margin_ratio']:.0%} of oracle {m['oracle_margin']:+.2f}) | gain/static {m['gain_static']:+.2f} dB | "
            f"{gaps} | sharpness {m['sharpness']:.2f}")


# ----------------------------------------------------------------------------------------------
# long rollouts: does the world hold together for hundreds of frames?

LONG_SEGMENTS = ((1, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, 256), (256, 448), (448, 512))
STATIC_ROW = "static copy of frame 0"  # the long-rollout baselines: what holding frame 0 scores,
REDRAWN_ROW = "re-drawn world (a perfect model)"  # and what the truth scores with the unseen re-drawn,
SHOWN_ROW = "frame 0's objects only (invents nothing)"  # or left out (a perfect model that invents nothing)
EXACT_DB = 40  # a segment's mean PSNR above this is shown as "> 40": frames equal to the truth have none finite
LONG_PNG_CLIPS = 3  # held-out paths in `metric.py long`'s picture of frames (OUT_frames.png)


def long_picks(frames):
    """The frames the long-rollout picture shows: 0, 8, 16, 32, 64, then every 64th, and the last."""
    picks = [f for f in (0, 8, 16, 32, 64, *range(128, frames, 64)) if f < frames]
    return picks + [frames - 1] if picks[-1] != frames - 1 else picks


def long_clips(n, frames, height, width, text_dim, text_len, seed=0, first=0):
    """n long held-out clips (world.long_heldout_path first .. first + n - 1): the true video (n, 3, F, H, W),
    cameras, text, and "redrawn" (n, 3, F, H, W): the same path through the scene with what frame 0 and the caption leave open
    drawn again (world.redraw_unseen): what a perfect world model, which cannot know it, would show; and
    "shown" (n, 3, F, H, W): the same with it left out: a perfect model that invents nothing."""
    out = {"video": [], "w2c": [], "K": [], "text": [], "redrawn": [], "shown": []}
    for i in range(first, first + n):
        scene_seed, _, cams = world.long_heldout_path(i, frames, seed, width, height)
        out["video"].append(world.render_world(scene_seed, cams, height, width))
        out["redrawn"].append(world.render_world(scene_seed, cams, height, width,
                                                 scene=world.redraw_unseen(scene_seed, cams, height, width)))
        out["shown"].append(world.render_world(scene_seed, cams, height, width, scene=world.redraw_unseen(
            scene_seed, cams, height, width, invent=False)))
        out["w2c"].append(cams.w2c[0])
        out["K"].append(cams.K[0])
        out["text"].append(world.text_embedding(world.caption(scene_seed), text_dim, text_len))
    return {k: torch.stack(v) for k, v in out.items()}


def frame_scores(video, truth):
    """Per-frame scores of video vs truth (B, 3, F, H, W) in [-1, 1], averaged over the clips, each (F,):
    psnr (dB); colour, the mean-colour error on a 0-1 scale (the largest difference of a channel's
    frame mean: a world that keeps its colours scores near 0); sharp and sharp_true, image-gradient
    energies (their ratio is the sharpness of metric.control_metric)."""
    mse = (video - truth).pow(2).mean(dim=(1, 3, 4))  # (B, F)
    colour = ((video.mean(dim=(3, 4)) - truth.mean(dim=(3, 4))).abs() / 2).amax(1)  # (B, F)
    energy = lambda v: ((v[..., :, 1:] - v[..., :, :-1]).pow(2).mean(dim=(1, 3, 4))
                        + (v[..., 1:, :] - v[..., :-1, :]).pow(2).mean(dim=(1, 3, 4)))
    return dict(psnr=(10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean(0), colour=colour.mean(0),
                sharp=energy(video).mean(0), sharp_true=energy(truth).mean(0))


def segment_scores(scores):
    """{"a-b": {psnr, colour, sharpness}} over LONG_SEGMENTS that fit in the scored frames."""
    F_ = len(scores["psnr"])
    return {f"{a}-{b - 1}": dict(psnr=scores["psnr"][a:b].mean().item(), colour=scores["colour"][a:b].mean().item(),
                                 sharpness=(scores["sharp"][a:b].mean() / scores["sharp_true"][a:b].mean()).item())
            for a, b in LONG_SEGMENTS if b <= F_}


@torch.no_grad()
def long_rollout_metric(sample, codec, clips, batch=8, seed=0, device="cpu", keep=0):
    """Frame-by-frame scores of a long rollout against the exact rendering, and of a static copy of frame 0.

    sample(noise, text, cameras, first) -> latents (B, C, F, h, w) (the model's streaming sampler).
    Returns {"model", "static", "redrawn" and "shown" (where clips has them)}: frame_scores each, averaged
    over the clips; with keep > 0 also "video": the first `keep` (<= batch) rollouts (keep, 3, F, H, W) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    baselines = [k for k in ("redrawn", "shown") if k in clips]  # renderings of the same paths (long_clips)
    parts = {"model": [], "static": [], **{k: [] for k in baselines}}
    for i in range(0, clips["video"].shape[0], batch):
        sl = slice(i, i + batch)
        truth = clips["video"][sl].to(device)  # (B, 3, F, H, W)
        x0 = codec.encode(truth[:, :, :1])  # only frame 0 is given
        shape = (truth.shape[0], x0.shape[1], truth.shape[2], *x0.shape[-2:])
        noise = torch.randn(shape, generator=generator).to(device)
        video = codec.decode(sample(noise, clips["text"][sl].to(device), Cameras(clips["w2c"][sl], clips["K"][sl]).to(device),
                                    x0[:, :, 0])).clamp(-1, 1)
        if i == 0:
            kept = video[:keep].cpu()  # the first paths' rollouts (keep <= batch), for a picture
        n = truth.shape[0]
        parts["model"].append({k: v * n for k, v in frame_scores(video, truth).items()})
        parts["static"].append({k: v * n for k, v in frame_scores(truth[:, :, :1].expand_as(truth), truth).items()})
        for b in baselines:
            parts[b].append({k: v * n for k, v in frame_scores(clips[b][sl].to(device), truth).items()})
    total = clips["video"].shape[0]
    out = {name: {k: sum(p[k] for p in ps) / total for k in ps[0]} for name, ps in parts.items()}
    return {**out, "video": kept} if keep else out


# ----------------------------------------------------------------------------------------------
# tables and pictures

def _ratio(m):
    """margin/oracle as a percentage; "–" where the oracle margin is not positive (logged as null)."""
    return "–" if m.get("margin_ratio") is None or m["oracle_margin"] <= 0 else f"{m['margin_ratio']:.0%}"


def _run_time(lines):
    """Seconds a training run took, from its metrics log's "time" (seconds since its start); a resumed run
    restarts its clock, so the segments are added up."""
    timed = [x["time"] for x in lines if "time" in x]
    return sum(a for a, b in zip(timed, timed[1:] + [0.0]) if b < a)


def results_table(out_dir, stages=("bidir", "ar", "ode", "cd", "dmd32", "dmd")):
    """Markdown table of each stage's last control metric (from OUT/NAME.metrics.jsonl) and run time."""
    head = ("| stage | sampler | steps | run time | PSNR | control margin (clips won) | oracle margin | "
            "margin/oracle | loss gap σ=.5 / .9 | gain over static | sharpness |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    samplers = {"bidir": "25 Euler, whole clip", "ar": "25 Euler / chunk, KV cache",  # logs written before
                "bidir_as_ar": "25 Euler / chunk, KV cache", "teacher_4step_euler": "4 Euler / chunk, KV cache"}
    for name in stages:
        path = os.path.join(out_dir, f"{name}.metrics.jsonl")
        if not os.path.exists(path):
            continue
        lines = [json.loads(x) for x in open(path) if x.strip()]
        timed, run_time = any("time" in x for x in lines), _run_time(lines)
        for model in dict.fromkeys(x.get("model", name) for x in lines if "eval" in x):
            ev = [x for x in lines if "eval" in x and x.get("model", name) == model][-1]
            m = ev["eval"]
            label = model if model == name else f"{name}: baseline {model}"
            rows.append(f"| {label} | {ev.get('sampler') or samplers.get(model, '4 renoise steps / chunk, KV cache')} | {ev['step']} | "
                        f"{run_time / 60:.0f} min | {m['psnr']:.2f} dB | {m['control_margin']:+.2f} dB "
                        f"({m['margin_wins']:.0%}) | {m['oracle_margin']:+.2f} dB | {_ratio(m)} | "
                        f"{m['loss_gap@0.5']:+.0%} / {m['loss_gap@0.9']:+.0%} | {m['gain_static']:+.2f} dB | "
                        f"{m['sharpness']:.2f} |" if timed else "")
    return "\n".join(r for r in rows if r)


def plot_control(out_dir, name, path=None, size=(520, 300)):
    """PNG of the control metric over training (loss gaps, control margin): control emerges suddenly."""
    from PIL import Image, ImageDraw
    rows = [json.loads(x) for x in open(os.path.join(out_dir, f"{name}.metrics.jsonl")) if '"eval"' in x]
    rows = [r for r in rows if r.get("model", name) == name]
    if not rows:
        raise ValueError(f"{out_dir}/{name}.metrics.jsonl holds no control metric of {name} yet (see --eval_every)")
    curves = {"loss gap, sigma 0.5 (%)": ("loss_gap@0.5", 100, (200, 40, 40)), "loss gap, sigma 0.9 (%)": ("loss_gap@0.9", 100, (230, 140, 30)),
              "control margin (dB x 20)": ("control_margin", 20, (40, 90, 200))}
    W, H, L, B = size[0], size[1], 50, 40
    steps = [r["step"] for r in rows]
    vals = [v * sc for key, sc, _ in curves.values() for v in (r["eval"][key] for r in rows)]
    lo, hi, smax = min(0.0, *vals), max(1.0, *vals), max(steps)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xy = lambda st, v: (L + (W - L - 10) * st / smax, H - B - (H - B - 20) * (v - lo) / (hi - lo))
    d.line([xy(0, 0), xy(smax, 0)], fill=(150, 150, 150))
    d.line([xy(0, lo), xy(0, hi)], fill=(150, 150, 150))
    for i, (label, (key, sc, col)) in enumerate(curves.items()):
        d.line([xy(r["step"], r["eval"][key] * sc) for r in rows], fill=col, width=2)
        d.text((L + 10, 5 + 12 * i), label, fill=col)
    d.text((L, H - B + 8), f"0 .. {smax} steps ({name})", fill=(0, 0, 0))
    d.text((5, xy(0, hi)[1]), f"{hi:.0f}", fill=(0, 0, 0))
    d.text((5, xy(0, 0)[1] - 6), "0", fill=(0, 0, 0))
    img.save(path or os.path.join(out_dir, f"{name}_control.png"))


# ----------------------------------------------------------------------------------------------
# the ablations (ablate.sh): the paper's findings as numbers

BATCH4_COPIES = ("batch_samples_4", "batch_updates_4")  # ablate.sh copies cam_exact's log to both
ABLATION_HEAD = ("| run | steps | run time | control margin (clips won) | oracle margin | margin/oracle | "
                 "loss gap σ=.5 / .9 | gain over static | PSNR | sharpness |")


def _evals(path, name):
    """[(step, metric)] of model `name` in a metrics log, and the run time in minutes (resumes summed)."""
    lines = [json.loads(x) for x in open(path) if x.strip()]
    return [(x["step"], x["eval"]) for x in lines if "eval" in x and x.get("model", name) == name], _run_time(lines) / 60


def _ablation_row(label, step, m, minutes):
    return (f"| {label} | {step} | {minutes:.0f} min | {m['control_margin']:+.2f} dB ({m['margin_wins']:.0%}) | "
            f"{m['oracle_margin']:+.2f} dB | {_ratio(m)} | {m['loss_gap@0.5']:+.0%} / {m['loss_gap@0.9']:+.0%} | "
            f"{m['gain_static']:+.2f} dB | {m['psnr']:.2f} dB | {m['sharpness']:.2f} |")


def ablation_tables(out_dir):
    """Markdown of the five ablations from what ablate.sh left in out_dir: camera quality (cam_*),
    control along training (cam_exact's evaluations), batch size at equal samples and at equal
    updates (batch_*), latency (bench.json, plus bench_gpu.json when a GPU run was saved), and the
    metric through the stages (chain/, a pipeline.sh run)."""
    log = lambda d: os.path.join(out_dir, d, "bidir.metrics.jsonl")
    runs = lambda prefix: sorted(d for d in os.listdir(out_dir) if d.startswith(prefix)  # evaluated at least once
                                 and os.path.exists(log(d)) and _evals(log(d), "bidir")[0])
    rule = "|" + " --- |" * (ABLATION_HEAD.count("|") - 1)
    out = []
    level = lambda d: tuple(json.load(open(os.path.join(out_dir, d, "bidir.json")))["config"][k]
                            for k in ("camera_noise", "camera_scale_drift"))
    cams = sorted(runs("cam_"), key=level)  # exact first, then by how far the poses are off
    if cams:
        out += ["### Camera quality (Phase 1 on exact vs perception-like poses)", "",
                ABLATION_HEAD.replace("| run |", "| poses: rotation / translation jitter, scale drift |"), rule]
        for d in cams:
            cfg = json.load(open(os.path.join(out_dir, d, "bidir.json")))["config"]
            evals, minutes = _evals(os.path.join(out_dir, d, "bidir.metrics.jsonl"), "bidir")
            label = ("exact" if not cfg["camera_noise"] and not cfg["camera_scale_drift"] else
                     f"{cfg['camera_noise']:g} rad / {cfg['camera_noise']:g} m, drift {cfg['camera_scale_drift']:g}")
            out.append(_ablation_row(label, *evals[-1], minutes))
        out.append("")
    if "cam_exact" in cams:
        evals, minutes = _evals(os.path.join(out_dir, "cam_exact", "bidir.metrics.jsonl"), "bidir")
        out += ["### Control along Phase 1 training (exact poses)", "",
                ABLATION_HEAD.replace("| run |", "| run |").replace("| run time |", "| (run time) |"), rule]
        out += [_ablation_row("exact poses", step, m, minutes * step / evals[-1][0]) for step, m in evals]
        out.append("")
    batches = runs("batch_")
    if batches:
        out += ["### Batch size (Phase 1), at equal samples seen and at equal updates", "",
                ABLATION_HEAD.replace("| run |", "| batch, budget |"), rule]
        key = lambda d: (d.split("_")[1], int(d.split("_")[2]))  # batch_{samples,updates}_{B}
        curves = {}
        for d in sorted(batches, key=key):
            evals, minutes = _evals(os.path.join(out_dir, d, "bidir.metrics.jsonl"), "bidir")
            out.append(_ablation_row(f"{key(d)[1]}, equal {key(d)[0]}", *evals[-1], minutes))
            curves[f"{key(d)[1]}, equal {key(d)[0]}"] = evals
        # when control arrives: each run's margin at each of its evaluations (ablate.sh evaluates every run the
        # same number of times over its budget, so a column is equal samples, or equal updates, within a budget)
        n = max(len(e) for e in curves.values())
        out += ["", "Control margin (clips won) at each evaluation, `step: margin`:", "",
                "| batch, budget | " + " | ".join(f"eval {i + 1}" for i in range(n)) + " |", "| --- |" + " --- |" * n]
        out += [f"| {label} | " + " | ".join(f"{step}: {m['control_margin']:+.2f} ({m['margin_wins']:.0%})"
                                              for step, m in evals) + " |" * (n - len(evals) + 1)
                for label, evals in curves.items()]
        out.append("")
    for name, what in (("bench.json", "this CPU"), ("bench_gpu.json", "GPU")):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            b = json.load(open(path))
            out += [f"### First-chunk latency ({what}: {b.get('device', '?')}, preset {b.get('preset', '?')})", "",
                    "| sampler | first frames after | vs bidirectional |", "| --- | --- | --- |"]
            bidir = b.get("bidir_50step_s") or b.get("bidir_50step_cfg_s")
            for label, key_ in (("bidirectional, 50 steps, whole clip", "bidir_50step_s"),
                                ("bidirectional, 50 steps + CFG, whole clip", "bidir_50step_cfg_s"),
                                ("AR, 25 Euler steps, first chunk (KV cache)", "ar_25step_first_chunk_s"),
                                ("AR, 4 steps, first chunk (KV cache)", "first_chunk_s")):
                if b.get(key_):
                    out.append(f"| {label} | {b[key_] * 1000:.0f} ms | x{bidir / b[key_]:.0f} |")
            out.append("")
    chain = os.path.join(out_dir, "chain")
    if os.path.isdir(chain):
        out += ["### Through the stages (one pipeline.sh chain)", "", results_table(chain), ""]
    # the full mode's run time, measured: every Phase 1 run's logged wall time (resumes summed; batch 4 under
    # both budgets is cam_exact's run, copied by ablate.sh, so not counted again) and the chain's time.txt
    own = [d for d in runs("cam_") + runs("batch_") if d not in BATCH4_COPIES]
    minutes = sum(_evals(log(d), "bidir")[1] for d in own)
    timed = os.path.join(chain, "time.txt")
    chain_min = int(re.search(r"(\d+) minutes", open(timed).read()).group(1)) if os.path.exists(timed) else None
    if own:
        total = minutes + (chain_min or 0)
        out += ["### Run time", "", f"{len(own)} Phase 1 runs: {minutes / 60:.1f} h of wall time summed"
                + (f"; the chain (chain/time.txt): {chain_min} min" if chain_min is not None else "; no chain yet")
                + f"; in all {total / 60:.1f} h (each run one thread; bench.py not counted).", ""]
    return "\n".join(out)


@torch.no_grad()
def compare_samples(path, ckpts, clips=2, scale=3):
    """PNG: for the first held-out clips, the truth's frames 1..F-1 above each checkpoint's few-step
    rollout of the same clip and noise (what the sharpness number means, as a picture). Clip length,
    frame size and text length are those the first checkpoint was trained with."""
    nets = [common.or_die(M.load_pretrained, ck).eval() for ck in ckpts]
    trained = common.StageConfig(**{k: v for k, v in json.load(open(common.stem_of(ckpts[0]) + ".json")).get(
        "config", {}).items() if k in ("frames", "height", "width")}, text_len=common.input_text_len(ckpts[0]))
    ev = eval_clips(clips, trained.frames, trained.height, trained.width, nets[0].cfg.text_dim, trained.text_len)
    codec, few = data.PixelCodec(2), M.few_step_sigmas(M.FEW_STEP_TIMESTEPS)
    x0, cams = codec.encode(ev["video"]), Cameras(ev["w2c"], ev["K"])  # (B, C, F, h, w)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))  # the same for every row
    rows = [("truth", ev["video"])]
    for ck, net in zip(ckpts, nets):
        sample, _ = metric_fns(net, "ar", few, renoise=True)
        rows.append((Path(ck).name, codec.decode(sample(noise, ev["text"], cams, x0[:, :, 0])).clamp(-1, 1)))
    frames_png(path, rows, clips, scale)


def frames_png(path, rows, clips, scale=3):
    """PNG of videos side by side: for each of the first `clips` clips, one row per (name, video (B, 3, F, H, W)
    in [-1, 1]) with its frames 1..F-1 (frame 0 is given) from left to right."""
    from PIL import Image, ImageDraw
    F_, H, W = rows[0][1].shape[2:]
    L, w, h = max(60, 6 * max(len(name) for name, _ in rows) + 10), W * scale, H * scale  # names in PIL's 6-px font
    img = Image.new("RGB", (L + (F_ - 1) * w, clips * len(rows) * h + (clips - 1) * 6), "white")
    d = ImageDraw.Draw(img)
    for c in range(clips):
        for r, (name, vid) in enumerate(rows):
            y = (c * len(rows) + r) * h + c * 6
            d.text((4, y + h // 2 - 5), name, fill=(0, 0, 0))
            for f in range(1, F_):
                px = ((vid[c, :, f] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
                img.paste(Image.fromarray(px).resize((w, h), Image.NEAREST), (L + (f - 1) * w, y))
    img.save(path, format="PNG")


@dataclass
class LongConfig:
    """python metric.py long --ckpts=A,B,...: the long-rollout measurement of each checkpoint."""
    ckpts: str = "assets/ar,assets/ode,assets/cd,assets/dmd"  # comma-separated checkpoints
    frames: int = 512  # latent frames per rollout
    clips: int = 8  # long held-out scenes x paths
    first_clip: int = 0  # score paths first_clip .. first_clip + clips - 1 (0-31 chose the streaming defaults;
    #                      from 32 on, paths that chose nothing)
    sink: int = M.STREAM_SINK  # the streaming cache, as infer.py's defaults
    window: int = M.STREAM_WINDOW
    steps: int = 25  # Euler steps per chunk for a Stage 1 ("ar") checkpoint; the others use their few steps
    context_sigma: float = -1.0  # the noise on generated context in the cache: -1 = each model's own (its config)
    draws: int = 1  # noise draws per path, averaged: one draw of 32 paths moves a segment's colour error by up to 0.005
    out: str = "out/long_rollout"  # writes OUT.png (curves), OUT.md (table by segment), OUT.json (per frame),
    #                                OUT_frames.png (the first paths: truth and each model at frames long_picks)
    device: str = ""


def streaming_sampler(path, cfg, device):
    """A checkpoint's streaming sampler, as infer.py runs it (cfg: sink, window, steps, context_sigma):
    (net, its training config (height, width, text_len), sample(noise, text, cameras, first, seed=0) -> latents;
    seed: the noise drawn inside the rollout (re-noising, commits))."""
    net = common.or_die(M.load_pretrained, path).to(device).eval()
    if cfg.context_sigma >= 0:
        net.cfg.context_sigma = cfg.context_sigma
    meta = common.or_die(common.load_checkpoint, path, load_opt=False)["meta"]  # a minWM checkpoint, or one line
    trained = common.StageConfig(**{k: v for k, v in meta.get("config", {}).items() if k in ("height", "width")},
                                 text_len=common.input_text_len(path))
    stage = meta.get("stage")
    sigmas = M.euler_sigmas(cfg.steps) if stage == "ar" else M.few_step_sigmas(M.FEW_STEP_TIMESTEPS)

    def sample(noise, text, cams, first, seed=0):
        return M.sample_ar(net, noise, text, cams, M.image_cond(first, noise.shape[2]), sigmas,
                           renoise=stage != "ar", sink=cfg.sink, window=cfg.window,
                           generator=torch.Generator(noise.device).manual_seed(seed))
    return net, trained, sample


def _check_long(cfg, name):
    """The checkpoints of cfg.ckpts as {row name: path}: each file's name, or the path as given where two
    share one (runs name their checkpoints alike: A/dmd, B/dmd); bad settings stop with one line."""
    paths = [p for p in cfg.ckpts.split(",") if p]
    first = LONG_SEGMENTS[0][1]  # the frames the first segment of the table needs
    if (not paths or cfg.frames < first or cfg.clips < 1 or cfg.first_clip < 0 or cfg.steps < 1 or cfg.window < 1
            or cfg.sink < 0 or cfg.draws < 1):
        common.die(f"metric.py {name}: give --ckpts=A,B,...; --frames >= {first}, --clips >= 1, --first_clip >= 0, "
                   "--steps >= 1, --window >= 1, --sink >= 0, --draws >= 1")
    names = [Path(p).name for p in paths]
    names = [os.path.normpath(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]
    if len(set(names)) < len(names):
        common.die(f"metric.py {name}: a checkpoint is given twice in --ckpts={cfg.ckpts}")
    return dict(zip(names, paths))


def long_report(cfg):
    """Run long_rollout_metric on every checkpoint of cfg.ckpts; write the table, the curves and the numbers."""
    device = common.device_of(cfg.device)
    results, baselines, per_draw, videos = {}, {}, {}, []
    for name, path in _check_long(cfg, "long").items():
        net, trained, sample = streaming_sampler(path, cfg, device)
        clips = long_clips(cfg.clips, cfg.frames, trained.height, trained.width, net.cfg.text_dim, trained.text_len,
                           first=cfg.first_clip)
        # draw d: the starting noise and the rollout's own noise both from seed d (draw 0 is the one-draw table)
        runs = [long_rollout_metric(functools.partial(sample, seed=d), data.PixelCodec(2), clips, seed=d, device=device,
                                    keep=0 if d else LONG_PNG_CLIPS) for d in range(cfg.draws)]
        videos.append((name, runs[0].pop("video")))  # draw 0's first paths, for the picture
        r = {row: {k: sum(run[row][k] for run in runs) / cfg.draws for k in runs[0][row]} for row in runs[0]}
        per_draw[name] = [segment_scores(run["model"]) for run in runs]
        if cfg.draws > 1:
            common.log(f"{path}: colour error by segment, each draw: " + " | ".join(
                f"{k} " + " ".join(f"{s[k]['colour']:.3f}" for s in per_draw[name]) for k in per_draw[name][0]))
        results[name], baselines = r["model"], r
        common.log(f"{path}: " + " | ".join(f"{k} {v['psnr']:.1f} dB {v['colour']:.3f} {v['sharpness']:.2f}"
                                            for k, v in segment_scores(r["model"]).items()))
    results[STATIC_ROW], results[SHOWN_ROW] = baselines["static"], baselines["shown"]
    results[REDRAWN_ROW] = baselines["redrawn"]
    table = long_table(results)
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    common.atomic_write(cfg.out + ".md", lambda p: Path(p).write_text(table + "\n"))
    per_frame = {name: {k: v.tolist() for k, v in s.items()} for name, s in results.items()}
    common.atomic_write(cfg.out + ".json", lambda p: Path(p).write_text(json.dumps(
        dict(settings=dataclasses.asdict(cfg), per_frame=per_frame, per_draw_segments=per_draw))))
    plot_long(results, cfg.out + ".png")
    picks = [0] + long_picks(cfg.frames)  # frames_png leaves out the first column (a clip's given frame 0)
    rows = [("truth", clips["video"][:LONG_PNG_CLIPS])] + videos
    common.atomic_write(cfg.out + "_frames.png", lambda p: frames_png(p, [(n, v[:, :, picks]) for n, v in rows],
                                                                     min(cfg.clips, LONG_PNG_CLIPS), scale=3))
    print(table)



REVEAL_CAPTIONS = ("true", "purple", "none")  # the caption as it is, every object named purple, no caption
REVEAL_PNG_CLIPS = 4  # clips in `metric.py reveal --out`'s picture


def reveal_clips(n, frames, height, width, text_dim, text_len, seed=0):
    """n held-out reveal clips (world.reveal_heldout_paths: the path turns until an object frame 0 does not show
    stands in the view): the true video (n, 3, F, H, W), cameras, "shown" (n, 3, F, H, W), the same path with
    that object (and every other frame 0 does not show) left out, and the text under each of REVEAL_CAPTIONS."""
    out = {"video": [], "shown": [], "w2c": [], "K": [], **{f"text_{c}": [] for c in REVEAL_CAPTIONS}}
    for scene_seed, _, cams in world.reveal_heldout_paths(n, frames, seed, width, height):
        out["video"].append(world.render_world(scene_seed, cams, height, width))
        out["shown"].append(world.render_world(scene_seed, cams, height, width, scene=world.redraw_unseen(
            scene_seed, cams, height, width, invent=False)))
        out["w2c"].append(cams.w2c[0])
        out["K"].append(cams.K[0])
        text = world.caption(scene_seed)
        purple = " ".join("purple" if w in world.OBJECT_COLOURS else w for w in text.split())
        out["text_true"].append(world.text_embedding(text, text_dim, text_len))
        out["text_purple"].append(world.text_embedding(purple, text_dim, text_len))
        out["text_none"].append(torch.zeros(text_len, text_dim))  # what caption dropout trains on
    return {k: torch.stack(v) for k, v in out.items()}


def reveal_scores(video, clips):
    """Where the entering object stands (truth and "shown" differ by > 0.1 in some channel, -1..1 scale): the
    mean largest-channel distance of `video` (n, 3, F, H, W) from the truth and from the world without it; and
    the mean-colour error of frames 1.. against the truth (frame_scores'). A model that draws what the caption
    names is near the truth there, one that invents nothing near "shown"."""
    where = (clips["video"] - clips["shown"]).abs().amax(1) > 0.1  # (n, F, H, W)
    gap = lambda other: (video - other).abs().amax(1)[where].mean().item()
    return dict(to_truth=gap(clips["video"]), to_shown=gap(clips["shown"]),
                colour=frame_scores(video, clips["video"])["colour"][1:].mean().item(), pixels=where.float().mean().item())


@dataclass
class RevealConfig:
    """python metric.py reveal --ckpts=A,B,...: does a model draw what only the caption names?"""
    ckpts: str = "assets/bidir,assets/dmd"  # comma-separated checkpoints: Phase 1 ones sample whole clips
    clips: int = 32  # held-out reveal paths
    frames: int = 8  # latent frames per clip
    steps: int = 25  # Euler steps (Phase 1 whole clip; Stage 1 per chunk); the distilled ones use their few
    guidance: float = 1.0  # text CFG for Phase 1 checkpoints
    out: str = ""  # OUT.md (the table) and OUT.png (the first clips: the truth, then each model, true caption), if given
    device: str = ""


def reveal_report(cfg):
    """Each checkpoint of cfg.ckpts on the held-out reveal clips, under each caption of REVEAL_CAPTIONS."""
    paths = [p for p in cfg.ckpts.split(",") if p]
    if not paths or cfg.clips < 1 or cfg.frames < 2 or cfg.steps < 1:
        common.die("metric.py reveal: give --ckpts=A,B,...; --clips >= 1, --frames >= 2, --steps >= 1")
    device, codec, rows, videos = common.device_of(cfg.device), data.PixelCodec(2), [], []
    head = ("| model | caption | entering object's pixels: to the truth / to the world without it | "
            "colour error, frames 1.. |")
    for path in paths:
        name = "/".join(Path(path).parts[-2:])  # run folder and checkpoint: runs name theirs alike (bidir, dmd)
        stream = dataclasses.replace(LongConfig(), steps=cfg.steps, device=cfg.device)
        net, trained, sample = streaming_sampler(path, stream, device)
        if json.load(open(common.stem_of(path) + ".json")).get("stage") == "bidir":  # whole clip, with CFG
            sample = lambda noise, text, cams, first: M.sample_bidir(
                net, noise, text, cams, M.image_cond(first, noise.shape[2]), M.euler_sigmas(cfg.steps),
                guidance=cfg.guidance)
        clips = reveal_clips(cfg.clips, cfg.frames, trained.height, trained.width, net.cfg.text_dim, trained.text_len)
        x0 = codec.encode(clips["video"])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        cams = Cameras(clips["w2c"], clips["K"]).to(device)
        for caption in REVEAL_CAPTIONS:
            with torch.no_grad():
                latents = sample(noise.to(device), clips[f"text_{caption}"].to(device), cams, x0[:, :, 0].to(device))
            video = codec.decode(latents.cpu()).clamp(-1, 1)
            s = reveal_scores(video, clips)
            if caption == "true":
                videos.append((name, video))
            rows.append(f"| {name} | {caption} | {s['to_truth']:.3f} / {s['to_shown']:.3f} | {s['colour']:.4f} |")
    s = reveal_scores(clips["shown"], clips)
    rows.append(f"| the world without it (invents nothing) | – | {s['to_truth']:.3f} / 0 | {s['colour']:.4f} |")
    table = "\n".join([head, "| --- | --- | --- | --- |", *rows,
                       f"\n{cfg.clips} held-out reveal paths; the entering object covers {s['pixels']:.1%} of their pixels."])
    if cfg.out:
        common.atomic_write(cfg.out + ".md", lambda p: Path(p).write_text(table + "\n"))
        common.atomic_write(cfg.out + ".png", lambda p: frames_png(p, [("truth", clips["video"])] + videos,
                                                                   min(cfg.clips, REVEAL_PNG_CLIPS), scale=2))
    print(table)

@dataclass
class StillConfig(LongConfig):
    """python metric.py still --ckpts=A,B,...: the camera stands still at each long held-out scene's start."""
    ckpts: str = "assets/cd,assets/dmd"
    frames: int = 64
    out: str = ""  # OUT.md: the table, if given


def still_clips(n, frames, height, width, text_dim, text_len, first=0):
    """The long held-out scenes first .. first + n - 1 (world.long_heldout_path's) seen from their start pose for
    `frames` frames: "first" (n, 3, H, W) the true frame 0, which every true frame equals; cameras and text as long_clips."""
    cams = load_cameras(f"x*{frames - 1}")  # (1, F): "x" stands still
    out = {"first": [], "text": []}
    for i in range(first, first + n):
        scene_seed = world.long_heldout_path(i, 2)[0]
        out["first"].append(world.render_world(scene_seed, Cameras(cams.w2c[:, :1], cams.K[:, :1]), height, width)[:, 0])
        out["text"].append(world.text_embedding(world.caption(scene_seed), text_dim, text_len))
    return {**{k: torch.stack(v) for k, v in out.items()}, "w2c": cams.w2c.expand(n, -1, -1, -1),
            "K": cams.K.expand(n, -1, -1)}


def still_scores(video, first):
    """Per-frame (F,) scores of video (B, 3, F, H, W) in [-1, 1] when the truth is first (B, 3, H, W) at every
    frame, averaged over the clips: psnr against frame 0, and flicker, the mean absolute change of a pixel
    from the previous frame in 1/255 (0 at frame 0; the truth's is 0 throughout)."""
    mse = (video - first[:, :, None]).pow(2).mean(dim=(1, 3, 4))  # (B, F)
    change = (video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(1, 3, 4)) * 127.5  # (B, F - 1)
    return dict(psnr=(10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean(0),
                flicker=torch.cat([torch.zeros(1), change.mean(0).cpu()]))


@torch.no_grad()
def still_report(cfg):
    """Each checkpoint of cfg.ckpts streams cfg.frames frames with the camera standing still; a table by
    segment of "PSNR vs frame 0 dB / flicker (1/255)"."""
    device, rows = common.device_of(cfg.device), []
    for name, path in _check_long(cfg, "still").items():
        net, trained, sample = streaming_sampler(path, cfg, device)
        clips = still_clips(cfg.clips, cfg.frames, trained.height, trained.width, net.cfg.text_dim, trained.text_len,
                            first=cfg.first_clip)
        codec = data.PixelCodec(2)
        x0 = codec.encode(clips["first"][:, :, None].to(device))  # (B, C, 1, h, w)
        draws = []
        for d in range(cfg.draws):  # as long_report: draw d's noise, and the rollout's own, from seed d
            noise = torch.randn((cfg.clips, x0.shape[1], cfg.frames, *x0.shape[-2:]),
                                generator=torch.Generator().manual_seed(d)).to(device)
            video = codec.decode(sample(noise, clips["text"].to(device), Cameras(clips["w2c"], clips["K"]).to(device),
                                        x0[:, :, 0], seed=d)).clamp(-1, 1)
            draws.append(still_scores(video, clips["first"].to(device)))
        sc = {k: sum(x[k] for x in draws) / cfg.draws for k in draws[0]}
        segments = [(a, b) for a, b in LONG_SEGMENTS if b <= cfg.frames]
        rows.append(f"| {name} | " + " | ".join(
            f"{sc['psnr'][a:b].mean():.1f} / {sc['flicker'][a:b].mean():.1f}" for a, b in segments) + " |")
    table = "\n".join(["| model | " + " | ".join(f"frames {a}-{b - 1}" for a, b in segments) + " |",
                       "| --- |" + " --- |" * len(segments), *rows])
    if cfg.out:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        common.atomic_write(cfg.out + ".md", lambda p: Path(p).write_text(table + "\n"))
    print(table)


def long_table(results):
    """Markdown: one row per model, one column per segment, cells "PSNR dB / colour error / sharpness"."""
    segments = list(segment_scores(next(iter(results.values()))))
    rows = ["| model | " + " | ".join(f"frames {s}" for s in segments) + " |", "| --- |" + " --- |" * len(segments)]
    for name, scores in results.items():
        cells = [f"{v['psnr']:.1f} / {v['colour']:.3f} / {v['sharpness']:.2f}" if v["psnr"] < EXACT_DB else
                 f"> {EXACT_DB} / {v['colour']:.3f} / {v['sharpness']:.2f}" for v in segment_scores(scores).values()]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_long(results, path, width=720, panel=150, smooth=8):
    """PNG: PSNR, mean-colour error and sharpness (vs the truth) along the rollout, one line per model;
    the goal lines: colour error 0.05, sharpness 0.5 and 2. The legend wraps to a second row if needed."""
    from PIL import Image, ImageDraw
    colours = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (150, 60, 170), (230, 140, 30), (20, 160, 160)]
    L, T, gap = 60, 20, 14
    mean = lambda x: torch.nn.functional.avg_pool1d(x[None, None].float(), smooth, 1, smooth // 2,
                                                    count_include_pad=False)[0, 0, :len(x)]
    curves = {name: dict(psnr=mean(s["psnr"][1:]), colour=mean(s["colour"][1:]),
                         sharpness=mean(s["sharp"][1:]) / mean(s["sharp_true"][1:])) for name, s in results.items()}
    cols = {name: {STATIC_ROW: (120, 120, 120), SHOWN_ROW: (150, 120, 90), REDRAWN_ROW: (175, 175, 175)}.get(
        name, colours[i % len(colours)])
            for i, name in enumerate(curves)}
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend, x, y = [], L, 4  # (x, y, name): left to right, then a new row
    for name in curves:
        w = d.textlength(name)
        if x + w > width - 10 and x > L:
            x, y = L, y + 12
        legend.append((x, y, name))
        x += w + gap
    T0 = y + 16  # the first panel starts below the legend
    img = Image.new("RGB", (width, T0 - T + 3 * (panel + T) + 30), "white")
    d = ImageDraw.Draw(img)
    for x, y, name in legend:
        d.text((x, y), name, fill=cols[name])
    F_ = len(next(iter(curves.values()))["psnr"])
    for p, (key, lo, hi, goals) in enumerate((("psnr", 5, 30, ()), ("colour", 0, 0.25, (0.05,)),
                                              ("sharpness", 0, 2.5, (0.5, 2.0)))):
        top = T0 + p * (panel + T)
        xy = lambda f, v: (L + (width - L - 10) * f / max(F_ - 1, 1), top + panel - panel * (min(max(v, lo), hi) - lo) / (hi - lo))
        d.rectangle([L, top, width - 10, top + panel], outline=(180, 180, 180))
        d.text((4, top), key, fill=(0, 0, 0))
        d.text((4, top + panel - 10), f"{lo:g}", fill=(90, 90, 90))
        d.text((4, top + 12), f"{hi:g}", fill=(90, 90, 90))
        for g in goals:
            d.line([xy(0, g), xy(F_ - 1, g)], fill=(200, 200, 200))
        for name, c in curves.items():
            if key == "psnr" and name in (REDRAWN_ROW, SHOWN_ROW):  # far above the panel: most frames equal the truth
                continue
            d.line([xy(f, v) for f, v in enumerate(c[key].tolist())], fill=cols[name], width=2)
    d.text((L, T0 - T + 3 * (panel + T) + 8), f"frames 1 .. {F_} (moving mean over {smooth})", fill=(0, 0, 0))
    img.save(path)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "table":
        if not os.path.isdir(sys.argv[2]):
            common.die(f"{sys.argv[2]}: no such folder (the --out_dir of a training run)")
        print(results_table(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "plot":
        common.check_file(os.path.join(sys.argv[2], f"{sys.argv[3]}.metrics.jsonl"), "training log")
        common.or_die(plot_control, sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare":
        compare_samples(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 3 and sys.argv[1] == "ablation":
        if not os.path.isdir(sys.argv[2]):
            common.die(f"{sys.argv[2]}: no such folder (ablate.sh's --out_dir)")
        tables = ablation_tables(sys.argv[2])
        common.atomic_write(os.path.join(sys.argv[2], "ablation.md"), lambda p: Path(p).write_text(tables + "\n"))
        print(tables)
    elif len(sys.argv) >= 2 and sys.argv[1] == "long":
        long_report(common.parse_config(LongConfig, sys.argv[2:]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "still":
        still_report(common.parse_config(StillConfig, sys.argv[2:]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "reveal":
        reveal_report(common.parse_config(RevealConfig, sys.argv[2:]))
    else:
        common.die("usage: python metric.py table OUT_DIR | python metric.py plot OUT_DIR NAME | "
                   "python metric.py compare OUT.png CKPT [CKPT ...] | python metric.py long|still|reveal [--ckpts=A,B ...] | "
                   "python metric.py ablation OUT_DIR")
