"""Phase 1: camera-controllable bidirectional fine-tuning (paper §2.1).

The DiT learns flow matching on whole clips, conditioned on text, the first frame (TI2V channel
concat) and the cameras (PRoPE). From base weights (`--init=PATH`, e.g. Wan2.1, which gets a
zero-initialized PRoPE branch so that step 0 equals the base model) or from scratch for the tiny
preset (inline PRoPE: projective and RoPE channels share one attention).

    python train_bidir.py                          # tiny model on the procedural world (idle 2-core CPU, ~100 min)
    python train_bidir.py --quick                  # smoke size
    python train_bidir.py --init=out/bidir --frames=16 --lr=3e-4 --min_lr=1e-4 --warmup=50 --max_steps=3000
                                                   # Phase 1 continued on 16-frame clips (LONG_ROLLOUTS.md)
    torchrun --nproc_per_node=8 train_bidir.py --init=Wan2.1-T2V-1.3B/ --data=cache/ --preset=wan2.1-t2v-1.3b
    python train_bidir.py --preset=tiny-mmdit       # the HunyuanVideo-1.5-style MMDiT (mmdit.py) on the same world
    torchrun --nproc_per_node=8 train_bidir.py --init=HunyuanVideo-1.5/transformer/ --data=cache/ --fsdp
"""
import os
import time
from dataclasses import dataclass

import torch

import common
import data
import metric
import model as M


@dataclass
class Config(common.StageConfig):
    preset: str = "tiny"  # model preset: model.PRESETS (Wan DiT) or mmdit.PRESETS (MMDiT, e.g. tiny-mmdit)
    init: str = ""  # base weights for model.load_pretrained; "" = from scratch
    prope: str = "inline"  # from scratch: inline | branch | none; with --init a camera-free base gets a branch
    #                        (none keeps it camera-free) and a checkpoint with PRoPE keeps its own
    name: str = "bidir"
    # batch 4: control emerges after a number of *updates*, so half the batch reaches it in ~half
    # the wall time (8k steps of batch 4 beat 10.4k of batch 8 here; README, Phase 1)
    batch_size: int = 4
    # 17,000: the 9,000 of the first default left control and colour still climbing; one schedule of 17,000 gave
    # every later stage a larger margin and truer colours (LONG_ROLLOUTS.md, "One schedule of 17,000 steps")
    max_steps: int = 17000
    lr: float = 1e-3
    min_lr: float = 3e-4
    warmup: int = 200
    ema: float = 0.998
    ema_warmup: int = 200  # from scratch: the EMA starts once the first, random weights are behind
    text_drop: float = 0.1  # caption dropout, so classifier-free guidance is possible later
    sigma_mean: float = 0.7  # location of the logit-normal σ; > 0 trains more at high noise, where only the camera tells the motion
    eval_every: int = 3000
    sample_steps: int = 25
    save_every: int = 500


QUICK = {**common.QUICK, "sample_steps": 3, "ema_warmup": 2}


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    rank, local_rank, world, device, stem = common.start(cfg)

    # model: base weights + zero-init PRoPE branch, or from scratch
    if cfg.init:  # base weights (+ zero-init PRoPE branch, + zero-init image-condition channels)
        if not (os.path.exists(cfg.init) or os.path.exists(cfg.init + ".safetensors")):  # a file, folder or minWM stem
            common.die(f"--init checkpoint not found: {cfg.init}")
        net = common.or_die(M.load_pretrained, cfg.init, model_config=cfg.model_config)
        # a checkpoint that has PRoPE (a Phase 1 run continued, e.g. on longer clips) keeps it as it is: forcing
        # a branch onto an inline-PRoPE model would drop the cameras it learnt; a camera-free base gets the branch
        if cfg.prope != "none":
            net = common.or_die(M.enable_prope_branch, net)
        net = M.enable_image_cond(net)
    else:
        net = common.or_die(lambda: M.build(M.make_config(cfg.preset, prope=cfg.prope)))  # the preset picks the class
    net.to(device)
    codec, source = data.training_source(cfg, net.cfg)
    ema, opt, first_step, model = common.setup_training(cfg, net, stem, rank, world, local_rank, device)
    common.log(f"{cfg.name}: {net.num_params() / 1e6:.2f}M parameters, PRoPE {net.cfg.prope}, {world} process(es), {device}")
    clips = metric.stage_clips(cfg, net.cfg, rank)
    sigmas = M.euler_sigmas(cfg.sample_steps, cfg.shift)
    saves = [dict(stem=stem, state_dict=net, ema_state=ema, optimizer=opt, stage="bidir", parent=cfg.init or None,
                  model_config=net.cfg)]

    bar, t0 = common.progress(cfg.max_steps, initial=first_step, desc=cfg.name), time.time()
    for step in range(first_step, common.last_step(cfg)):
        lr = common.set_lr(opt, cfg, step)
        b = source(step, rank, world, device)  # this rank's share of the global batch of `step`
        cond = M.image_cond(b["x0"][:, :, 0], b["x0"].shape[2])
        u = b["u"][:, 0].clamp(1e-4, 1 - 1e-4)  # away from 0 and 1, where the normal quantile is infinite
        sigma = M.shift_sigma(torch.sigmoid(cfg.sigma_mean + torch.special.ndtri(u)), cfg.shift)  # logit-normal σ, shifted
        with common.autocast(device):  # Phase 1 loss (paper §2.1): flow matching on whole clips
            loss = M.flow_matching_loss(model, b["x0"], b["noise"], sigma, b["text"], b["cameras"], cond)
        gnorm = common.optimizer_step(loss, opt, model, cfg, step, ema)
        if common.end_of_step(cfg, step + 1, bar, t0, dict(loss=loss, lr=lr, gnorm=gnorm), saves):
            metric.report(cfg, clips, codec, step + 1, ema, "bidir", sigmas, device=device)


if __name__ == "__main__":
    main()
