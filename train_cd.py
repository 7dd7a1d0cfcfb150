"""Stage 2b: causal consistency distillation (paper §2.2, Stage 2b; Causal Forcing++) — no stored pairs.

Noise the ground truth to x_t at a point σ of a fine grid, take ONE teacher Euler step to x_t' at the
next grid point σ', and pull the student's x0 at (x_t, σ) towards the EMA student's x0 at (x_t', σ')
(the consistency target; at σ' = 0 it is x_t' itself). Everything under teacher forcing: each chunk
has its own σ and sees the clean ground-truth chunks before it. The student samples in the few steps
M.FEW_STEP_TIMESTEPS (warped by the shift), predicting x0 and re-noising in between.

    python train_cd.py --ckpt=out/ar           # tiny model (CPU)
    python train_cd.py --ckpt=out/ar --quick
    python train_cd.py --ckpt=out/ar --frames=24 --wander --batch_size=4 --eval_frames=8   # Stage 1's long clips

On clips longer than the window every teacher-forced call attends as the rollout's cache will (tf_sink,
tf_window), as Stage 1 does; on the 8-frame clips of the shipped recipe the window covers the whole clip.
"""
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
import data
import metric
import model as M


@dataclass
class Config(common.StageConfig):
    ckpt: str = "out/ar"  # the Stage 1 AR teacher (also the student's initialization)
    name: str = "cd"
    grid: int = 48  # fine σ grid of the consistency steps (shifted schedule)
    timesteps: tuple[int, ...] = M.FEW_STEP_TIMESTEPS  # the student's few-step sampler
    guidance: float = 1.0  # teacher CFG for the ODE step; 1.0: toy captions restate frame 0
    max_steps: int = 300
    ema: float = 0.95  # the target network's decay (LCM / Causal Forcing++ use ~0.95)
    tf_sink: int = M.TRAIN_SINK  # teacher forcing sees only the first tf_sink frames and the tf_window frames
    tf_window: int = M.STREAM_WINDOW  # before each chunk, as Stage 1 (binds only on clips longer than the window)
    seed: int = 3


QUICK = {**common.QUICK, "grid": 8}


def x0_of(net, x_t, sigma, text, cams, cond, x0_ctx, ctx_t=None, **mask):
    """The consistency function f(x_t, σ) = x_t - σ v(x_t, σ); σ (B, F), ground-truth context x0_ctx;
    mask: sink=, window= of the teacher-forced attention (model.forward)."""
    return x_t - sigma[:, None, :, None, None] * net(x_t, 1000 * sigma, text, cams, cond, clean=x0_ctx, clean_t=ctx_t, **mask)


@torch.no_grad()
def cd_target(teacher, target_net, x_t, sigma, sigma_next, text, cams, cond, x0_ctx, guidance=1.0, ctx_t=None, **mask):
    """One teacher Euler step x_t -> x_t' (σ -> σ'), then the EMA student's x0 at (x_t', σ')."""
    v = M.guided_velocity(teacher, x_t, 1000 * sigma, text, cams, cond, clean=x0_ctx, clean_t=ctx_t, guidance=guidance,
                          **mask)
    x_next = x_t + (sigma_next - sigma)[:, None, :, None, None] * v
    return x0_of(target_net, x_next, sigma_next, text, cams, cond, x0_ctx, ctx_t, **mask)


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    rank, local_rank, world, device, stem = common.start(cfg)
    teacher = common.frozen(common.or_die(M.load_pretrained, cfg.ckpt, model_config=cfg.model_config).to(device))
    chunk = teacher.cfg.chunk
    codec, source = data.training_source(cfg, teacher.cfg)
    net = copy.deepcopy(teacher).train()  # the student starts as the teacher
    common.requires_grad(net, True)
    # the EMA is the consistency target (and the student shipped)
    ema, opt, first_step, model = common.setup_training(cfg, net, stem, rank, world, local_rank, device)
    grid = torch.tensor(M.euler_sigmas(cfg.grid, cfg.shift), device=device)  # (grid + 1,) from 1 to 0
    few = M.few_step_sigmas(cfg.timesteps, cfg.shift)
    clips = metric.stage_clips(cfg, net.cfg, rank)
    saves = [dict(stem=stem, state_dict=net, ema_state=ema, optimizer=opt, stage="cd", parent=cfg.ckpt,
                  model_config=net.cfg)]

    common.log(f"{cfg.name}: student and target from {cfg.ckpt}, grid {cfg.grid}, target EMA {cfg.ema}")
    if first_step == 0:
        metric.report_teacher_baselines(cfg, clips, codec, teacher, few, device)
    mask = dict(sink=cfg.tf_sink, window=cfg.tf_window or None)  # long clips attend as the rollout's cache
    bar, t0 = common.progress(cfg.max_steps, initial=first_step, desc=cfg.name), time.time()
    for step in range(first_step, common.last_step(cfg)):
        lr = common.set_lr(opt, cfg, step)
        b = source(step, rank, world, device)
        x0 = b["x0"]
        cond = M.image_cond(x0[:, :, 0], x0.shape[2])
        # one grid point per chunk; at most grid - 1, so that the next point σ' exists
        i = (b["u"][:, ::chunk] * cfg.grid).long().clamp(max=cfg.grid - 1).repeat_interleave(chunk, 1)  # (B, F)
        sigma, sigma_next = grid[i], grid[i + 1]
        x_t = M.add_noise(x0, b["noise"], sigma[:, None, :, None, None])
        ctx, ctx_t = M.noisy_context(x0, b["u_context"], b["noise_context"], net.cfg, chunk)  # as the teacher learned
        target = cd_target(teacher, ema, x_t, sigma, sigma_next, b["text"], b["cameras"], cond, ctx, cfg.guidance, ctx_t,
                           **mask)
        with common.autocast(device):
            loss = F.mse_loss(x0_of(model, x_t, sigma, b["text"], b["cameras"], cond, ctx, ctx_t, **mask).float(),
                              target.float())
        gnorm = common.optimizer_step(loss, opt, model, cfg, step, ema)
        if common.end_of_step(cfg, step + 1, bar, t0, dict(loss=loss, lr=lr, gnorm=gnorm), saves):
            metric.report(cfg, clips, codec, step + 1, ema, "ar", few, renoise=True, device=device)


if __name__ == "__main__":
    main()
