"""Stage 1: autoregressive diffusion by teacher forcing (paper §2.2, Stage 1).

The bidirectional camera-controlled model becomes causal. Each training sequence is
[clean clip | noisy clip] under the block-causal mask (model.teacher_forcing_mask): a noisy chunk sees
the clean chunks before it and itself, every chunk has its own σ, and both halves share positions,
cameras and the first-frame condition. At inference the clean half is the KV cache (model.sample_ar).

For rollouts of any length (README, Long rollouts) the defaults train what a long rollout does:
- clips of 24 latent frames on wandering paths, three times the 8 the bidirectional model saw, with
  attention limited as the rollout's cache limits it (the sink frame 0 and the 8 frames before each
  chunk: tf_sink, tf_window), so frames far from frame 0 are normal training;
- noisy context (GameNGen's augmentation): every context chunk but frame 0 is noised to a σ drawn up
  to context_noise, with its timestep, so the model learns to correct the errors of its own past frames
  instead of copying them; at inference each generated chunk enters the cache noised to context_sigma
  (model.commit). Both levels go into the model's config, which every later stage and infer.py read.

    python train_ar.py --ckpt=out/bidir            # tiny model (CPU, about an hour)
    python train_ar.py --ckpt=assets/bidir --quick
"""
import time
from dataclasses import dataclass

import torch

import common
import data
import metric
import model as M


@dataclass
class Config(common.StageConfig):
    ckpt: str = "out/bidir"  # the Phase 1 checkpoint
    name: str = "ar"
    chunk: int = 2  # latent frames per AR chunk (4 at Wan scale)
    frames: int = 24  # latent frames per training clip: beyond the window, so the sink is far
    wander: bool = True  # long clips on wandering paths that stay in the scene (world.long_actions)
    batch_size: int = 4  # 24-frame clips: 3 times the tokens of an 8-frame one
    eval_frames: int = 8  # the control metric on the 8-frame held-out clips every stage shares
    max_steps: int = 600  # the shipped chain (README, Results); ~20-45 min on 2 CPU cores. Not more: at 2400 the
    #                       first frames are better but long rollouts drift more (LONG_ROLLOUTS.md, Stage 1 trained
    #                       four times as long)
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 50
    ema: float = 0.995
    text_drop: float = 0.1  # caption dropout keeps the unconditional branch alive for CFG
    sample_steps: int = 25
    seed: int = 1
    # long rollouts (README, Long rollouts): the model's context convention, kept in its config for every
    # later stage and for inference, and the attention of teacher forcing limited as the rollout's cache
    context_noise: float = 0.8  # teacher forcing: context chunks noised to sigma ~ U(0, this), t = 1000 sigma
    context_sigma: float = 0.7  # rollout: generated chunks enter the KV cache noised to this sigma
    tf_sink: int = M.TRAIN_SINK  # teacher forcing sees only the first tf_sink frames and the tf_window
    tf_window: int = M.STREAM_WINDOW  # frames before each chunk, as the rollout's cache (0: all frames)


QUICK = {**common.QUICK, "sample_steps": 3}


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    rank, local_rank, world, device, stem = common.start(cfg)
    if cfg.chunk < 1 or cfg.frames % cfg.chunk:
        common.die(f"--chunk={cfg.chunk} must be at least 1 and divide --frames={cfg.frames}")
    net = common.or_die(M.load_pretrained, cfg.ckpt, model_config=cfg.model_config, chunk=cfg.chunk,
                        context_noise=cfg.context_noise, context_sigma=cfg.context_sigma).to(device)
    codec, source = data.training_source(cfg, net.cfg)
    ema, opt, first_step, model = common.setup_training(cfg, net, stem, rank, world, local_rank, device)
    common.log(f"{cfg.name}: from {cfg.ckpt}, {net.num_params() / 1e6:.2f}M parameters, chunk {cfg.chunk}, {world} process(es)")
    clips = metric.stage_clips(cfg, net.cfg, rank)
    sigmas = M.euler_sigmas(cfg.sample_steps, cfg.shift)  # the AR many-step sampler, through the KV cache
    saves = [dict(stem=stem, state_dict=net, ema_state=ema, optimizer=opt, stage="ar", parent=cfg.ckpt,
                  model_config=net.cfg)]

    if first_step == 0:  # the bidirectional weights used autoregressively, before Stage 1
        metric.report(cfg, clips, codec, 0, net, "ar", sigmas, label="bidir_as_ar", device=device)
    bar, t0 = common.progress(cfg.max_steps, initial=first_step, desc=cfg.name), time.time()
    for step in range(first_step, common.last_step(cfg)):
        lr = common.set_lr(opt, cfg, step)
        b = source(step, rank, world, device)
        x0 = b["x0"]  # (B, C, F, h, w)
        cond = M.image_cond(x0[:, :, 0], x0.shape[2])
        u = b["u"][:, :: cfg.chunk].clamp(1e-4, 1 - 1e-4)  # one uniform per chunk
        # σ constant within each chunk, independent across chunks (Diffusion-Forcing style): (B, F)
        sigma = M.shift_sigma(torch.sigmoid(torch.special.ndtri(u)), cfg.shift).repeat_interleave(cfg.chunk, 1)
        ctx, ctx_t = M.noisy_context(x0, b["u_context"], b["noise_context"], net.cfg, cfg.chunk)  # (B, C, F, h, w)
        with common.autocast(device):  # Stage 1 loss: flow matching on the noisy half of [x0 | x_t], block-causal
            loss = M.flow_matching_loss(model, x0, b["noise"], sigma, b["text"], b["cameras"], cond, clean=ctx, clean_t=ctx_t,
                                        sink=cfg.tf_sink, window=cfg.tf_window or None)
        gnorm = common.optimizer_step(loss, opt, model, cfg, step, ema)
        if common.end_of_step(cfg, step + 1, bar, t0, dict(loss=loss, lr=lr, gnorm=gnorm), saves):
            metric.report(cfg, clips, codec, step + 1, ema, "ar", sigmas, device=device)


if __name__ == "__main__":
    main()
