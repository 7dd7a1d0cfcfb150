"""Stage 3: asymmetric DMD with self-rollout (paper §2.3; DMD2 / Self-Forcing lineage).

The few-step AR student (from Stage 2a or 2b) rolls out whole clips by itself through its KV cache,
chunk by chunk. One exit step k is drawn per iteration and shared by all chunks: steps before k and
the cache refresh run without gradient, so the gradient flows only through each chunk's exit-step
forward. The student's clip is scored by two bidirectional camera-conditioned models:
  real score  the frozen Phase 1 teacher (optionally with classifier-free guidance),
  fake score  a critic initialized from the same teacher and trained online by flow matching on the
              student's own samples (`critic_steps` updates per generator update).
The DMD gradient (x0_fake - x0_real) / mean|x_g - x0_real| pushes the student's distribution towards
the teacher's - matching a distribution rather than regressing to a blurry mean.

Long rollouts (Self-Forcing++; README, Long rollouts): the student rolls out `rollout_frames` (32) through
the cache it streams with at inference (sink + window, each chunk committed as model.commit does),
and a random window of `frames` (8, the teachers' clip length) is scored; only the window's chunks carry
gradient. So the student is trained in the states a long rollout reaches - after its own errors - not
only in the first 8 frames. Both scores see the window conditioned on the training clip's TRUE frame at
the window's start (`window_cond`): judged against its own first frame, a window whose colours had
drifted looked as plausible as any, and rollouts drifted (README, Long rollouts). `--anchor=W` adds a
regression of each scored frame's colour (its latent averaged over `anchor_grid`² cells) to the true clip's:
DMD says what a window should look like, not where the world's colours are once frame 0 is far behind.

The shipped model is two passes (pipeline.sh): 600 steps on 32-frame rollouts (dmd32), then 200 on 64-frame
ones with a fresh critic and the anchor (dmd):

    python train_dmd.py --ckpt=out/cd --teacher=out/bidir --name=dmd32
    python train_dmd.py --ckpt=out/dmd32 --teacher=out/bidir --rollout_frames=64 --max_steps=200 --anchor=5
    python train_dmd.py --ckpt=out/cd --teacher=out/bidir --quick
"""
import copy
import dataclasses
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
import data
import metric
import model as M


CONSTANT_LR = "Stage 3's learning rates are constant (--lr, --critic_lr), as in Self-Forcing"


@dataclass
class Config(common.StageConfig):
    ckpt: str = "out/ode"  # the few-step student (Stage 2a or 2b)
    teacher: str = "out/bidir"  # real score (frozen) and the fake score's initialization
    name: str = "dmd"
    timesteps: tuple[int, ...] = M.FEW_STEP_TIMESTEPS
    guidance: float = 1.0  # real-score CFG (3.0 at Wan scale; the toy captions restate frame 0)
    critic_steps: int = 3  # fake-score updates per generator update (each one a rollout: 3 keeps long ones affordable)
    sigma_min: float = 0.02  # range of the noise level at which both scores are queried
    sigma_max: float = 0.98
    max_steps: int = 600  # generator steps
    lr: float = 3e-5  # generator (2e-6 at scale; the tiny model moves too little at 1e-5 in 200 steps)
    # both learning rates stay constant, as in Self-Forcing: the common schedule's flags are refused here
    warmup: int = dataclasses.field(default=20, init=False, metadata={"why": CONSTANT_LR})  # (the common defaults,
    min_lr: float = dataclasses.field(default=1e-5, init=False, metadata={"why": CONSTANT_LR})  # unused)
    critic_lr: float = 6e-5  # fake score: twice the generator's, so the critic keeps up
    rollout_frames: int = 32  # > frames: roll out this long (Self-Forcing++) and score a random window of
    #                           `frames` (the teacher's clip length) of it; 0 = frames (Self-Forcing)
    first_window: float = 0.0  # the probability that the window scored is the rollout's first (frames 0..7: the
    #                            short clip, as Self-Forcing) rather than one drawn uniformly over the rollout
    window_cond: str = "true"  # the first frame a window past frame 0 is scored given: "true" (the training
    #                            clip's frame there: the scores judge the window against where the world should be,
    #                            so a rollout that drifted scores badly) or "own" (the rollout's own frame there:
    #                            data-free, as Self-Forcing++; it let colours drift, README Long rollouts)
    context_sigma: float = -1.0  # the noise each rolled-out chunk enters the cache with (model.commit); it goes
    #                              into the student's model config, so infer.py commits the same: -1 = the student's
    anchor: float = 0.0  # weight of a low-frequency regression of the scored window to the training clip's true
    #                      frames (anchor_loss): DMD matches distributions, this ties a long rollout's colours to
    #                      where the world is (DMD v1 paired its distribution matching with a regression loss)
    anchor_grid: int = 1  # the regression compares each frame's latent averaged over a grid x grid of cells (1: its mean)
    anchor_frames: str = "window"  # the frames the anchor regresses: "window" (the scored window) or "rollout"
    #                                (every frame rolled out: each chunk's exit step then carries gradient)
    anchor_on: str = "all"  # the pixels the anchor regresses: "all", or "shown": only those where the true clip equals
    #                         the same path with the objects frame 0 does not show left out (what frame 0 and the
    #                         cameras determine: the anchor then asks nothing the model cannot know; embedded world only)
    sink: int = M.TRAIN_SINK  # the student's cache while rolling out (inference keeps M.STREAM_SINK)
    window: int = M.STREAM_WINDOW
    log_every: int = 1  # a step takes seconds: log every one
    eval_every: int = 100
    save_every: int = 50
    seed: int = 4


QUICK = {**common.QUICK, "max_steps": 3, "critic_steps": 2, "eval_every": 3, "save_every": 2, "rollout_frames": 8}


def self_rollout(student, noise, text, cams, first, sigmas, exit_step, generator=None, grad_from=0, sink=M.TRAIN_SINK,
                 window=None):
    """The student generates the clip chunk by chunk; gradient only through each chunk's exit step.

    sigmas: the few-step list with a final 0; exit_step in [0, len(sigmas) - 1). Returns the x0
    predictions (B, C, F, h, w) of every chunk's exit step, carrying gradient from frame grad_from on
    (the chunks before it run without: a long rollout's lead-in to the window DMD scores). The cache
    keeps `sink` + `window` frames as at inference (window None: every frame).
    """
    B, C, F_, H, W = noise.shape
    chunk = student.cfg.chunk
    cache = student.new_cache(B, H, W, sink=sink, window=window or F_, device=noise.device)
    out, grad = [], torch.is_grad_enabled()
    for start in range(0, F_, chunk):
        stop = min(start + chunk, F_)
        c_cams, cond = cams.frames(start, stop), M.image_cond(first, stop - start, start)
        x = noise[:, :, start:stop]
        with torch.no_grad():  # the steps before the exit: few-step sampling, no gradient
            for s, s_next in zip(sigmas[:exit_step], sigmas[1:exit_step + 1]):
                v = student(x, M.timestep(s, B, x.device), text, c_cams, cond, cache=cache, frame_offset=start)
                x = M.add_noise(x - s * v, torch.randn(x.shape, generator=generator, device=x.device), s_next)
        s = sigmas[exit_step]
        # the exit step carries the gradient (from grad_from on); its forward concatenates the cache rather
        # than writing the chunk into it, since a later in-place write would change tensors autograd saved
        with torch.set_grad_enabled(grad and start >= grad_from):
            x0 = x - s * student(x, M.timestep(s, B, x.device), text, c_cams, cond, cache=cache, frame_offset=start)
        x0 = M.given_first(x0, cond, start)  # frame 0 is the given image, as at inference
        with torch.no_grad():  # the chunk becomes context as at inference (model.commit), no gradient
            M.commit(student, cache, x0.detach(), start, text, c_cams, cond, generator)
        out.append(x0)
    return torch.cat(out, 2)


def window_start(seed, rollout, frames, chunk, first_window=0.0):
    """The first frame of the window DMD scores in a rollout of `rollout` frames: a chunk-aligned start drawn
    uniformly so that the window of `frames` fits, or 0 with probability first_window; fixed for a seed."""
    g = torch.Generator().manual_seed(seed)
    start = chunk * int(torch.randint((rollout - frames) // chunk + 1, (), generator=g))
    return 0 if torch.rand((), generator=g) < first_window else start


def window_first(x0, window, start, how):
    """The first frame (B, C, h, w) both scores condition a window of the rollout on: frame 0 is the
    given image; past it the window's own first frame ("own") or the true one at `start` ("true", from
    the training clip x0 (B, C, R, h, w)): a window that drifted from the world then scores badly."""
    if start == 0:
        return x0[:, :, 0]
    return x0[:, :, start] if how == "true" else window[:, :, 0]


def dmd_loss(x_g, real, fake, text, cams, cond, sigma, noise, guidance=1.0):
    """Stage 3 generator loss: 0.5 || x_g - sg(x_g - grad) ||² has gradient ∝ grad w.r.t. x_g, with

    grad = (x0_fake - x0_real) / mean|x_g - x0_real|  (per sample; DMD's normalized score difference)
    where both scores see x_t = (1 - σ) x_g + σ ε. sigma: (B,).
    """
    s = sigma.view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        x_t = M.add_noise(x_g, noise, s)
        x0_real = x_t - s * M.guided_velocity(real, x_t, 1000 * sigma, text, cams, cond, guidance=guidance)
        x0_fake = x_t - s * fake(x_t, 1000 * sigma, text, cams, cond)
        norm = (x_g - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        grad = torch.nan_to_num((x0_fake - x0_real) / norm)
    return 0.5 * F.mse_loss(x_g.float(), (x_g - grad).detach().float())


def anchor_loss(x_g, truth, grid=1, known=None):
    """Mean squared difference of the window x_g (B, C, F, h, w) and the true frames (same shape), each
    frame averaged over grid x grid cells: the colour of a frame, not its detail, which the future leaves open.
    known (B, 1, F, h, w) in {0, 1}: only those latent pixels count (a cell's difference is summed over its
    known pixels and divided by all of them, so a cell half unknown weighs half)."""
    diff = x_g.float() - truth.float()  # (B, C, F, h, w)
    if known is not None:
        diff = diff * known
    return F.adaptive_avg_pool3d(diff, (diff.shape[2], grid, grid)).pow(2).mean()  # cells (B, C, F, grid, grid)


def known_pixels(x0, x0_shown):
    """(B, 1, F, h, w): 1 where the true clip's latent x0 equals the rendering with frame 0's objects only
    (every channel), i.e. where no object frame 0 does not show stands; 0 elsewhere."""
    return (x0 == x0_shown).all(dim=1, keepdim=True).float()


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    if cfg.window_cond not in ("own", "true"):
        common.die(f"--window_cond={cfg.window_cond} must be 'true' or 'own'")
    if cfg.anchor_frames not in ("window", "rollout"):
        common.die(f"--anchor_frames={cfg.anchor_frames} must be 'window' or 'rollout'")
    if cfg.anchor_on not in ("all", "shown"):
        common.die(f"--anchor_on={cfg.anchor_on} must be 'all' or 'shown'")
    if cfg.anchor_on == "shown" and cfg.data:
        common.die("--anchor_on=shown needs the embedded world (it renders what frame 0 does not show): drop --data")
    if cfg.anchor < 0 or cfg.anchor_grid < 1:
        common.die(f"--anchor={cfg.anchor} must be at least 0 and --anchor_grid={cfg.anchor_grid} at least 1")
    rank, local_rank, world, device, stem = common.start(cfg)
    if cfg.fsdp:  # three models, several forwards per backward: sharded DMD is not written yet
        common.die("--fsdp: train_dmd.py does not shard yet; run it with DDP (plain torchrun)")
    student = common.or_die(M.load_pretrained, cfg.ckpt, model_config=cfg.model_config).to(device).train()
    if cfg.context_sigma >= 0:
        student.cfg.context_sigma = cfg.context_sigma
    real = common.frozen(common.or_die(M.load_pretrained, cfg.teacher, model_config=cfg.model_config).to(device))
    if real.cfg.out_channels != student.cfg.out_channels or real.cfg.prope != student.cfg.prope:
        common.die(f"--teacher {cfg.teacher} and --ckpt {cfg.ckpt} are different architectures")
    fake = copy.deepcopy(real).train()  # the critic starts as the real score
    common.requires_grad(fake, True)
    ema = common.frozen_copy(student)
    # Adam with beta1 = 0: the two players' gradients change fast, momentum makes the game unstable
    opt_g = common.adamw(student.parameters(), cfg, betas=(0.0, 0.999))
    opt_f = common.adamw(fake.parameters(), cfg, lr=cfg.critic_lr, betas=(0.0, 0.999))
    opts = {"generator": opt_g, "critic": opt_f}
    first_step = 0
    if cfg.resume:
        first_step = common.resume(stem, student, ema, opts, rank, config=cfg)
        if os.path.exists(stem + "_critic.json"):
            fake.load_state_dict(common.or_die(common.load_checkpoint, stem + "_critic", load_opt=False)["state"])
    # no DDP wrapper: the critic and the real score run several forwards per backward; the gradients
    # are averaged over ranks by hand (optimizer_step(average_grads=True))
    R, F_, chunk = cfg.rollout_frames or cfg.frames, cfg.frames, student.cfg.chunk
    if R < F_ or R % chunk or F_ % chunk:
        common.die(f"--rollout_frames={R} and --frames={F_} must be multiples of the chunk ({chunk}), rollout >= frames")
    # clips of the rollout's length (only frame 0, the text and the cameras are used past the window);
    # a long rollout needs a path that stays in the scene: a wandering one
    codec, source = data.training_source(dataclasses.replace(cfg, frames=R, wander=R > F_), student.cfg,
                                         shown=cfg.anchor > 0 and cfg.anchor_on == "shown")
    few = M.few_step_sigmas(cfg.timesteps, cfg.shift)
    clips = metric.stage_clips(cfg, student.cfg, rank)
    saves = [dict(stem=stem + "_critic", state_dict=fake, stage="dmd_critic", parent=cfg.teacher, model_config=fake.cfg),
             dict(stem=stem, state_dict=student, ema_state=ema, optimizer=opts, stage="dmd", parent=cfg.ckpt,
                  model_config=student.cfg)]

    common.log(f"{cfg.name}: student {cfg.ckpt}, real/fake score {cfg.teacher}, {cfg.critic_steps} critic steps per step")
    if first_step == 0:
        metric.report(cfg, clips, codec, 0, ema, "ar", few, renoise=True, label="student", device=device)
    bar, t0 = common.progress(cfg.max_steps, initial=first_step, desc=cfg.name), time.time()
    loss_f = torch.zeros((), device=device)  # stays 0 with --critic_steps=0 (a frozen fake score)
    loss_a = torch.zeros((), device=device)  # stays 0 without --anchor
    for step in range(first_step, common.last_step(cfg)):
        for j in range(cfg.critic_steps + 1):  # critic_steps critic updates, then one generator update
            b = source(step * (cfg.critic_steps + 1) + j, rank, world, device)
            x0, text, cams = b["x0"], b["text"], b["cameras"]  # x0 (B, C, R, h, w): frame 0 starts the rollout
            first = x0[:, :, 0]
            seed = common.mix_seed(cfg.seed, step, j, rank)
            generator = torch.Generator(device).manual_seed(seed)
            # the window scored: F_ frames from a chunk-aligned start; the rollout runs up to its end
            start = window_start(seed, R, F_, chunk, cfg.first_window)
            stop = start + F_
            noise_roll = torch.randn((*x0.shape[:2], stop, *x0.shape[3:]), generator=generator, device=device)
            cams_w, noise = cams.frames(start, stop), b["noise"][:, :, :F_]
            sigma = cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * b["u"][:, 0]  # (B,)
            if j < cfg.critic_steps:  # critic: flow matching on fresh student samples
                with torch.no_grad():
                    x_s = M.sample_ar(student, noise_roll, text, cams.frames(0, stop), M.image_cond(first, stop), few,
                                      renoise=True, sink=cfg.sink, window=cfg.window, generator=generator)[:, :, start:]
                # the fake score learns the student's distribution: flow matching on its samples, each window
                # conditioned as the generator's window is scored (window_first)
                cond = M.image_cond(window_first(x0, x_s, start, cfg.window_cond), F_)
                loss_f = M.flow_matching_loss(fake, x_s, noise, sigma, text, cams_w, cond)
                common.optimizer_step(loss_f, opt_f, fake, cfg, step, average_grads=True)
            else:  # generator: self-rollout with one shared exit step, DMD gradient on the window
                exit_step = int(torch.randint(len(few) - 1, (), generator=torch.Generator().manual_seed(seed)))
                # the anchor on the whole rollout needs every chunk's exit step to carry gradient
                a0 = 0 if cfg.anchor > 0 and cfg.anchor_frames == "rollout" else start
                x_all = self_rollout(student, noise_roll, text, cams.frames(0, stop), first, few, exit_step,
                                     generator=generator, grad_from=a0, sink=cfg.sink, window=cfg.window)  # (B, C, stop, h, w)
                x_g = x_all[:, :, start:]  # the window both scores see
                cond = M.image_cond(window_first(x0, x_g.detach(), start, cfg.window_cond), F_)
                loss_d = dmd_loss(x_g, real, fake, text, cams_w, cond, sigma, noise, cfg.guidance)
                if cfg.anchor > 0:
                    known = known_pixels(x0, b["x0_shown"])[:, :, a0:stop] if "x0_shown" in b else None
                    loss_a = anchor_loss(x_all[:, :, a0:], x0[:, :, a0:stop], cfg.anchor_grid, known)
                gnorm = common.optimizer_step(loss_d + cfg.anchor * loss_a, opt_g, student, cfg, step, ema,
                                              average_grads=True)
        scalars = dict(critic=loss_f, dmd=loss_d, anchor=loss_a, gnorm=gnorm, exit=exit_step)
        if common.end_of_step(cfg, step + 1, bar, t0, scalars, saves):
            metric.report(cfg, clips, codec, step + 1, ema, "ar", few, renoise=True, device=device)


if __name__ == "__main__":
    main()
