"""Stage 1: autoregressive diffusion by teacher forcing (paper §2.2, Stage 1).

The bidirectional camera-controlled model becomes causal. Each training sequence is
[clean clip | noisy clip] under the block-causal mask (model.teacher_forcing_mask): a noisy chunk sees
the clean chunks before it and itself, every chunk has its own σ, and both halves share positions,
cameras and the first-frame condition. At inference the clean half is the KV cache (model.sample_ar).

    python train_ar.py --ckpt=out/bidir            # tiny model (CPU, ~30 min)
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
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 50
    ema: float = 0.995
    text_drop: float = 0.1  # caption dropout keeps the unconditional branch alive for CFG
    sample_steps: int = 25
    seed: int = 1


QUICK = {**common.QUICK, "sample_steps": 3}


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    rank, local_rank, world, device, stem = common.start(cfg)
    if cfg.chunk < 1 or cfg.frames % cfg.chunk:
        common.die(f"--chunk={cfg.chunk} must be at least 1 and divide --frames={cfg.frames}")
    net = common.or_die(M.load_pretrained, cfg.ckpt, model_config=cfg.model_config, chunk=cfg.chunk).to(device)
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
        with common.autocast(device):  # Stage 1 loss: flow matching on the noisy half of [x0 | x_t], block-causal
            loss = M.flow_matching_loss(model, x0, b["noise"], sigma, b["text"], b["cameras"], cond, clean=x0)
        gnorm = common.optimizer_step(loss, opt, model, cfg, step, ema)
        if common.end_of_step(cfg, step + 1, bar, t0, dict(loss=loss, lr=lr, gnorm=gnorm), saves):
            metric.report(cfg, clips, codec, step + 1, ema, "ar", sigmas, device=device)


if __name__ == "__main__":
    main()
