"""
The plumbing every minWM stage shares, and nothing else: `--key=value` flags, DDP / FSDP set-up, seeding,
logging, atomic checkpoint IO, and the few lines of training bookkeeping that every stage's loop
ends with (`end_of_step`). It knows nothing about the model, the data or the metric; reports,
tables and plots live in `metric.py`.
"""
import atexit, contextlib, copy, dataclasses, difflib, json, math, os, random, re, sys, time, types, typing
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.tensor import DTensor, distribute_tensor
from safetensors.torch import save_file
from tqdm import tqdm

# ----------------------------------------------------------------------------- errors and config

def die(msg):
    """Print one line `error: msg` to stderr (and the log file) and exit with status 2."""
    line = "error: " + " ".join(str(msg).split())
    print(line, file=sys.stderr, flush=True)
    _append_log(line)
    sys.exit(2)

def or_die(fn, *args, **kwargs):
    """fn(*args, **kwargs), with a ValueError (bad file, bad input) turned into one `error:` line."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        die(e)

def check_file(path, what):
    """Die with `what not found: path` unless path exists; returns path."""
    if not os.path.exists(path):
        die(f"{what} not found: {path}")
    return path

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

def _closest(word, choices):
    """The nearest valid name: same words in another order (lr_max -> max_lr), else by spelling."""
    same = [c for c in choices if sorted(c.split("_")) == sorted(word.split("_"))]
    close = same or difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return close[0] if close else None

def _type_name(tp):
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")

def _convert(text, tp):
    """Parse a command-line string as type tp (int, float, str, bool, list/tuple of those, X | None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        return _convert(text, next(a for a in args if a is not type(None)))
    if origin in (list, tuple):  # "1000,750,500" or "[1000, 750, 500]"
        items = [s.strip() for s in text.strip().strip("[]()").split(",") if s.strip()]
        values = [_convert(s, args[0] if args else str) for s in items]
        return tuple(values) if origin is tuple else values
    if tp is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(text)
        return text.lower() in _TRUE
    if tp is int:  # also accept 1e4 for step counts, but not 2.5
        try:
            return int(text)
        except ValueError:
            f = float(text)
            if not f.is_integer():
                raise
            return int(f)
    if tp in (float, str):
        return tp(text)
    raise TypeError(f"parse_config: unsupported field type {_type_name(tp)}")  # a bug in the stage

def _print_help(cfg, hints, presets):
    print(f"usage: python {os.path.basename(sys.argv[0])} [--key=value | --key value | --flag] ...")
    for f in dataclasses.fields(cfg):
        if f.init:
            print(f"  --{f.name:<24} {_type_name(hints[f.name]):<12} default: {getattr(cfg, f.name)!r}")
    if presets:
        print("presets: " + ", ".join(presets))

def parse_config(cfg, argv=None, presets=None, quick=None):
    """Return a copy of the dataclass cfg (class or instance) with command-line overrides applied.

    Presets (name -> {field: value}) are applied first (the one named by --preset, else the
    field's default), then `quick` ({field: value}, when --quick is given: the smoke size),
    then the explicit flags in order, so `--preset=big --lr=1e-4` and `--quick --max_steps=3` work.
    Any mistake prints one `error:` line and exits 2; --help/-h prints the flags and exits 0."""
    cfg = cfg() if isinstance(cfg, type) else dataclasses.replace(cfg)
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg) if f.init]
    # a field a stage declares with init=False and metadata {"why": ...} is a common flag that has no effect
    # there: refused with that reason rather than silently ignored
    refused = {f.name: f.metadata["why"] for f in dataclasses.fields(cfg) if not f.init and "why" in f.metadata}
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        _print_help(cfg, hints, presets)
        sys.exit(0)
    overrides, i = [], 0  # (name, text) in command-line order
    while i < len(argv):
        tok, i = argv[i], i + 1
        if not tok.startswith("--") or tok == "--":
            die(f"unexpected argument {tok!r} (flags look like --key=value)")
        key, eq, text = tok[2:].partition("=")
        key = key.replace("-", "_")
        if key in refused:
            die(f"--{key} does not apply to {os.path.basename(sys.argv[0])}: {refused[key]}")
        if key not in names:
            close = _closest(key, names)
            die(f"unknown flag --{key}" + (f" (did you mean --{close}?)" if close else ""))
        tp = hints[key]
        if not eq:  # "--key value", or a bare "--flag" meaning True
            if tp is bool and i < len(argv) and argv[i].lower() in _TRUE + _FALSE:
                text, i = argv[i], i + 1
            elif tp is bool:
                text = "true"
            elif i < len(argv) and not argv[i].startswith("--"):
                text, i = argv[i], i + 1
            else:
                die(f"--{key} expects {_type_name(tp)}, got nothing")
        try:
            overrides.append((key, _convert(text, tp)))
        except ValueError:
            die(f"--{key} expects {_type_name(tp)}, got {text!r}")
    if "preset" in names and presets is not None:
        name = next((v for k, v in reversed(overrides) if k == "preset"), cfg.preset)
        if name and name not in presets:
            close = _closest(name, presets)
            die(f"unknown preset {name!r}" + (f" (did you mean {close!r}?)" if close else "")
                + f"; choose from: {', '.join(presets)}")
        for key, value in (presets.get(name) or {}).items():
            if key not in names:
                die(f"preset {name!r} sets unknown field {key!r}")
            setattr(cfg, key, value)
    if quick and any(k == "quick" and v for k, v in overrides):
        for key, value in quick.items():
            setattr(cfg, key, value)
    for key, value in overrides:
        setattr(cfg, key, value)
    return cfg

@dataclasses.dataclass
class StageConfig:
    """The flags every training stage has; a stage's Config subclasses it, adds its own fields and
    re-declares the defaults it changes (lr, max_steps, ...)."""
    data: str = ""  # a cache from `python data.py prepare`; "" = the procedural world
    model_config: str = ""  # for --ckpt / --teacher / --init weights that carry no config: a checkpoint's JSON or ModelConfig fields
    out_dir: str = "out"  # checkpoints, logs, samples
    frames: int = 8  # latent frames per clip
    height: int = 32  # video pixels (procedural world)
    width: int = 32
    text_len: int = 0  # text tokens; 0 = the input checkpoint's (input_text_len), TEXT_LEN from scratch
    batch_size: int = 8  # global batch, split over the ranks
    max_steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int = 20
    weight_decay: float = 0.0  # AdamW's; 0 everywhere (the models are small and the data endless)
    grad_clip: float = 1.0
    ema: float = 0.99
    ema_warmup: int = 0  # steps during which the EMA copies the weights instead of averaging them:
    #                      from scratch the first weights are noise not worth remembering; a stage
    #                      that starts from trained weights keeps 0 (its EMA starts at those weights)
    shift: float = 1.0  # sigma shift of the flow-matching schedule (5 at Wan scale)
    text_drop: float = 0.0  # caption dropout: keeps the null-text branch alive for CFG
    camera_noise: float = 0.0  # ablation: jitter training poses like perception-estimated cameras (rad, m)
    camera_scale_drift: float = 0.0  # ablation: a drifting translation scale along each clip (cameras.perturb_cameras)
    wander: bool = False  # clips on long wandering paths (world.long_actions) rather than the 8-frame clip kinds
    reveal: float = 0.0  # share of clips turning towards an object frame 0 does not show (world.reveal_path): only the caption says what it is
    log_every: int = 10  # loss, lr, grad norm -> OUT_DIR/NAME.metrics.jsonl and the bar
    eval_every: int = 250  # control metric + sample gif
    eval_clips: int = 16
    eval_frames: int = 0  # latent frames of the held-out clips of the control metric (0 = --frames)
    save_every: int = 250
    seed: int = 0
    resume: bool = False  # continue OUT_DIR/NAME from its last save (weights, optimizer, RNG)
    overwrite: bool = False  # start OUT_DIR/NAME afresh although a checkpoint is there (its log starts anew too)
    stop_after: int = 0  # end this run after N steps as if interrupted (resume later with --resume)
    quick: bool = False  # smoke size for tests and CI
    device: str = ""  # "" = cuda if available, else cpu
    grad_ckpt: bool = False  # activation checkpointing per block: long clips at scale fit in memory
    compile: bool = False  # torch.compile the model that trains (CUDA)
    fsdp: bool = False  # shard weights, gradients and Adam state over the processes (torch's fully_shard)
    #                     instead of DDP's full copy on each: for models (the 8B MMDiT) that do not fit one GPU

# the smoke size every stage's --quick starts from
QUICK = dict(frames=4, height=16, width=16, batch_size=2, max_steps=6, warmup=2, eval_every=6, eval_clips=2,
             save_every=3, eval_frames=0)

# ----------------------------------------------------------------------------- DDP and seeding

def device_of(name):
    """--device: "" (cuda if there is one, else cpu), cpu, cuda or cuda:N; a device that does not exist
    here stops with one line instead of a traceback at the first tensor."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        die(f"--device={name}: not a device (use cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        die(f"--device={name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        die(f"--device={name}: this machine has no CUDA GPU (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        die(f"--device={name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device

def setup_ddp(device=None):
    """Read torchrun's env; init the process group only when WORLD_SIZE > 1 (torn down at exit).
    Returns (rank, local_rank, world_size, device); device defaults to cuda:LOCAL_RANK if any, else cpu."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = device_of(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(cleanup_ddp)  # however the stage ends, the process group goes with it
    return rank, local_rank, world_size, device

def timesteps_problem(timesteps):
    """What is wrong with a few-step sampler's --timesteps, in one line, or None: at least one, each in
    (0, 1000] (sigma in (0, 1]), decreasing. Shared by infer.py, metric.py and the stages that take them."""
    ts = list(timesteps)
    if not ts:
        return "--timesteps must list at least one timestep, e.g. 1000,750,500,250"
    if not all(0 < t <= 1000 for t in ts):
        return f"--timesteps must lie in (0, 1000] (sigma in (0, 1]), got {ts}"
    if not all(a > b for a, b in zip(ts, ts[1:])):
        return f"--timesteps must decrease, got {ts}"
    return None


def check_stage_config(cfg):
    """Refuse, in one line each, settings that cannot give a meaningful run (before anything is loaded)."""
    rules = {  # field: (test, what it must be)
        **{k: (lambda v: v >= 1, "at least 1") for k in ("batch_size", "height", "width", "max_steps",
                                                        "eval_every", "save_every", "log_every", "eval_clips")},
        **{k: (lambda v: v >= 0, "at least 0") for k in ("warmup", "ema_warmup", "stop_after", "seed")},
        "text_len": (lambda v: v >= 0, "at least 0 (0 = the input checkpoint's)"),
        **{k: (lambda v: math.isfinite(v) and v > 0, "a finite number > 0") for k in ("lr", "shift", "grad_clip")},
        **{k: (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0") for k in ("min_lr", "weight_decay",
                                                                                       "camera_noise", "camera_scale_drift")},
        "frames": (lambda v: v >= 2, "at least 2 (frame 0 is given, the rest are generated)"),
        "ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "text_drop": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        **{k: (lambda v: 0 <= v <= 1, "in [0, 1]") for k in ("context_noise", "first_window", "reveal")},
        "context_sigma": (lambda v: 0 <= v <= 1 or v == -1 == getattr(type(cfg), "context_sigma", None),
                          "in [0, 1] (or -1 where that is the default: the input model's own)"),
        **{k: (lambda v: v >= 0, "at least 0") for k in ("eval_frames", "tf_sink", "tf_window", "rollout_frames")},
    }
    for key, (ok, what) in rules.items():
        if hasattr(cfg, key) and not ok(getattr(cfg, key)):
            die(f"--{key}={getattr(cfg, key)} must be {what}")
    problem = timesteps_problem(cfg.timesteps) if hasattr(cfg, "timesteps") else None  # the few-step stages
    if problem:
        die(problem)
    if not cfg.data and (cfg.height % 4 or cfg.width % 4):  # pixel codec x2, then the patch x2
        die(f"--height={cfg.height} --width={cfg.width}: the embedded world needs multiples of 4")
    if cfg.resume and cfg.overwrite:
        die("--resume and --overwrite contradict each other: continue the run, or start it over")

def start(cfg):
    """The first lines of every stage: checks, DDP, out_dir, log file, seeds. Returns (rank, local_rank,
    world, device, stem). A run never silently replaces a checkpoint or its own input."""
    check_stage_config(cfg)
    if cfg.text_len == 0:  # a later stage reads the caption as its input model learnt it
        cfg.text_len = input_text_len(getattr(cfg, "ckpt", "") or getattr(cfg, "init", ""))
    stem = os.path.join(cfg.out_dir, cfg.name)
    for key in ("ckpt", "teacher", "init"):  # the inputs
        if getattr(cfg, key, "") and os.path.abspath(stem_of(getattr(cfg, key))) == os.path.abspath(stem):
            die(f"--{key}={getattr(cfg, key)} is this run's own output ({stem}): pick another --out_dir or --name")
    if not cfg.resume and os.path.exists(stem + ".json") and not cfg.overwrite:
        die(f"{stem} already holds a checkpoint: --resume continues it, --overwrite starts it over")
    rank, local_rank, world, device = setup_ddp(getattr(cfg, "device", "") or None)
    if cfg.batch_size % world:
        die(f"--batch_size={cfg.batch_size} is not divisible by the {world} processes")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.overwrite and is_main():  # a run started over keeps no lines of the old one's log
        for suffix in (".metrics.jsonl", ".log"):
            if os.path.exists(stem + suffix):
                os.remove(stem + suffix)
    set_log_file(stem + ".log")
    seed_everything(cfg.seed, rank)
    return rank, local_rank, world, device, stem

def ddp(model, world, local_rank, device):
    """The model wrapped in DistributedDataParallel when several processes train, else itself.

    A model whose forward leaves some parameters without a gradient says so (`unused_parameters = True`:
    the MMDiT's last text block, whose output nothing reads) and DDP then looks for them every step."""
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                                     find_unused_parameters=getattr(model, "unused_parameters", False))

def shard(model, device):
    """FSDP: torch's `fully_shard` over all processes, in place. Every element of every nn.ModuleList (the
    repeated blocks) becomes one unit and the rest goes with the root; each parameter becomes a DTensor
    holding 1/world of the tensor. The forward all-gathers a unit's weights just before it runs and frees
    them after, the backward reduce-scatters (averages) its gradients, so Adam's state exists only for the
    shards. torchrun launches it as it launches DDP; checkpoints are gathered whole (save_checkpoint)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    with torch.no_grad():  # rank 0's weights everywhere, as DDP does (ranks seed differently: seed_everything)
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    units = [block for m in model.modules() if isinstance(m, torch.nn.ModuleList) for block in m]
    for block in reversed(units):  # innermost first: fully_shard wants children before their parents
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model

def is_sharded(state):
    """True when a module's (or state dict's) tensors are FSDP shards (DTensors)."""
    values = unwrap(state).parameters() if isinstance(state, torch.nn.Module) else state.values()
    return any(isinstance(v, DTensor) for v in values)

def _whole(x):
    """The whole tensor of an FSDP shard (an all-gather: every rank must call it, in the same order)."""
    return x.full_tensor() if isinstance(x, DTensor) else x

def _cut_like(full, ref):
    """A whole tensor (read by every rank) cut to ref's shard when ref is an FSDP DTensor, else itself."""
    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements)
    return full

def load_weights(model, state):
    """model.load_state_dict(state) for a whole state dict, also into an FSDP-sharded model."""
    model = unwrap(model)
    own = model.state_dict()
    model.load_state_dict({k: _cut_like(v, own[k]) if k in own else v for k, v in state.items()})

def cleanup_ddp():
    """Tear down the process group if one was started."""
    if dist.is_initialized():
        dist.destroy_process_group()

def is_main():
    """True on rank 0 (and in a single process); works before setup_ddp too."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0

def all_reduce_mean(tensor):
    """Mean of a tensor over all ranks (a detached copy); the tensor itself when single-process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()

def all_reduce_grads(model):
    """Average .grad over ranks by hand: for losses DDP cannot wrap (several forwards per backward, as in DMD)."""
    if dist.is_available() and dist.is_initialized():
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()

def unwrap(model):
    """The raw module under DDP and/or torch.compile wrappers (what you save and EMA)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)

def mix_seed(*ints):
    """A deterministic 62-bit seed from a tuple of non-negative integers (seed, sample index, purpose, ...).

    Every random draw of a sample is seeded from such a tuple, so it does not depend on which
    process draws it or whether the run was resumed."""
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint64)[0] >> 2)

def seed_everything(seed, rank=0):
    """Seed python, numpy and torch with seed + rank so ranks draw different noise; returns it."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed

# ----------------------------------------------------------------------------- logging

_log_file = None
_log_live = False  # set by the first log() line: an error before it (bad flags, a bad checkpoint) is not the run's

def set_log_file(path):
    """Also append every log() line (and, once the run has logged, its error line) to path (rank 0 only)."""
    global _log_file, _log_live
    _log_file, _log_live = path, False
    if path and is_main():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

def log(msg):
    """Print on rank 0 without breaking a tqdm bar; also append to the log file if set."""
    global _log_live
    if not is_main():
        return
    tqdm.write(str(msg))
    _log_live = True
    _append_log(msg)

def _append_log(line):  # one open per line: nothing is lost if the run is killed
    if _log_file and _log_live and is_main():
        with open(_log_file, "a") as f:
            f.write(f"{line}\n")

def log_metrics(out_dir, name, row):
    """Append one JSON line to out_dir/name.metrics.jsonl (rank 0): the numbers behind plots and README."""
    if is_main():
        with open(os.path.join(out_dir, f"{name}.metrics.jsonl"), "a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")

def progress(iterable_or_total, **kw):
    """A tqdm bar on rank 0 (disabled elsewhere); pass an iterable or a total step count."""
    kw = {"disable": not is_main(), "dynamic_ncols": True, **kw}
    if isinstance(iterable_or_total, int):
        return tqdm(total=iterable_or_total, **kw)
    return tqdm(iterable_or_total, **kw)

# ----------------------------------------------------------------------------- checkpoints

def stem_of(path):  # "x", "x.safetensors", "x.json" and "x.opt.pt" all name checkpoint x
    return re.sub(r"\.(safetensors|json|opt\.pt)$", "", str(path))

TEXT_LEN = 16  # text tokens of a model trained from scratch (the embedded world's captions: 25 words on average, 31 at most)


def input_text_len(path):
    """The text length checkpoint `path` was trained with (its JSON's config), TEXT_LEN if it records none or there
    is no checkpoint: a stage or a rollout must feed a model captions cut as it learnt them (a model trained on
    32 tokens fed 16 loses the caption's second half without a word)."""
    try:
        return int(json.load(open(stem_of(path) + ".json"))["config"]["text_len"]) if path else TEXT_LEN
    except (OSError, ValueError, KeyError, TypeError):
        return TEXT_LEN


def _jsonable(x):
    """Dataclasses -> dicts, tuples -> lists, dtypes/paths -> strings, recursively."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)) or isinstance(x, float) and math.isfinite(x):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN: null, which every reader understands
    return _jsonable(x.item()) if isinstance(x, (np.generic, torch.Tensor)) and x.ndim == 0 else str(x)

def atomic_write(path, write):
    """write(tmp) then fsync and os.replace, so path is either the old file or the complete new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # readable like any other file, whatever the writer's default
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def _prepare(state, dtype, prefix=""):
    """CPU, contiguous, optionally cast, and never two tensors on one storage (safetensors refuses).
    FSDP shards are gathered whole, one tensor at a time; only rank 0 keeps them (others get {})."""
    state = unwrap(state).state_dict() if isinstance(state, torch.nn.Module) else state
    out, seen = {}, set()
    for k, v in state.items():
        t = _whole(v.detach())
        if not is_main():
            continue
        t = t.cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()  # tied weights or views of one buffer
        seen.add(t.untyped_storage().data_ptr())
        out[prefix + k] = t
    return out

def save_checkpoint(stem, state_dict, *, config, stage, step, parent=None, model_config=None,
                    ema_state=None, optimizer=None, extra=None, dtype=None):
    """Write stem.safetensors (+ `ema.` copy), stem.json and, with an optimizer, stem.opt.pt.

    Rank 0 writes (other ranks return at once). Order: optimizer, weights, JSON; each file is
    atomic, and all three record `step`, which load_checkpoint checks, so a save cut off halfway
    is caught at load. optimizer may be one optimizer or a dict of them (e.g. DMD's two).
    FSDP-sharded weights are gathered first, on every rank (a collective), into the same files as DDP's."""
    if not is_main() and not is_sharded(state_dict):
        return
    if isinstance(dtype, str):  # "fp16", "bf16", "fp32" or a torch name like "bfloat16"
        dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype))
    tensors = _prepare(state_dict, dtype)
    if ema_state is not None:
        tensors.update(_prepare(ema_state, dtype, prefix="ema."))
    if optimizer is not None:
        opt = _optimizer_state(optimizer) if hasattr(optimizer, "state_dict") else {
            k: _optimizer_state(o) for k, o in optimizer.items()}
    if not is_main():
        return
    stem = stem_of(stem)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    if optimizer is not None:
        keys, pos, has_gauss, gauss = np.random.get_state()[1:]
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": [keys.tolist(), int(pos), int(has_gauss), float(gauss)],
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        atomic_write(stem + ".opt.pt", lambda p: torch.save({"optimizer": opt, "step": step, "rng": rng}, p))
    elif os.path.exists(stem + ".opt.pt"):
        os.remove(stem + ".opt.pt")  # a stale optimizer state must not be resumed with new weights
    atomic_write(stem + ".safetensors", lambda p: save_file(tensors, p, metadata=weights_header(stage, step, model_config)))
    meta = {"config": _jsonable(config), "model": _jsonable(model_config), "stage": stage, "step": step,
            "parent": parent, "command": " ".join(sys.argv), "dtype": str(dtype or "as trained")}
    for k, v in (extra or {}).items():
        if k in meta:
            raise ValueError(f"save_checkpoint: extra key {k!r} clashes with a standard field")
        meta[k] = _jsonable(v)
    atomic_write(stem + ".json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return stem

def weights_header(stage, step, model_config):
    """The metadata inside every weights file we write: the model config travels with the weights, so
    a .safetensors (or .pt) copied without its JSON still loads as the model it was."""
    header = {"format": "pt", "stage": str(stage), "step": str(step)}
    if model_config is not None:
        header["model"] = json.dumps(_jsonable(model_config))
    return header

def _optimizer_state(optimizer):
    """optimizer.state_dict() with FSDP-sharded state (Adam's moments) gathered whole: DDP's format."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: _whole(v) for k, v in st.items()} for i, st in sd["state"].items()}
    return sd

def _optimizer_state_like(sd, optimizer):
    """A saved (whole-tensor) optimizer state dict, its tensors cut to the shards of optimizer's parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in sd["param_groups"] for i in group["params"]]
    if len(ids) != len(params) or not any(isinstance(p, DTensor) for p in params):
        return sd  # (a size mismatch is the optimizer's own load_state_dict error to report)
    by_id = dict(zip(ids, params))
    state = {i: {k: _cut_like(v, by_id[i]) if torch.is_tensor(v) and v.shape == by_id[i].shape else v
                 for k, v in st.items()} for i, st in sd["state"].items()}
    return {**sd, "state": state}

def load_checkpoint(path, device="cpu", load_opt=True):
    """Read x / x.safetensors / x.json -> dict(state, ema (None if absent), meta, opt (None if absent)).
    Any missing, truncated or inconsistent file raises ValueError with one line naming it."""
    stem = stem_of(path)
    json_path, st_path, opt_path = stem + ".json", stem + ".safetensors", stem + ".opt.pt"
    for p in (json_path, st_path):
        if not os.path.exists(p):
            raise ValueError(f"{p}: file not found")
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: invalid JSON ({e})") from None
    try:
        with safe_open(st_path, framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{st_path}: unreadable safetensors ({' '.join(str(e).split())})") from None
    if "step" in header and header["step"] != str(meta.get("step")):
        raise ValueError(f"{st_path}: weights are from step {header['step']} but {json_path} says "
                         f"{meta.get('step')} (an interrupted save?)")
    state = {k: v for k, v in tensors.items() if not k.startswith("ema.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    opt = None
    if load_opt and os.path.exists(opt_path):
        try:
            opt = torch.load(opt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{opt_path}: unreadable optimizer state ({' '.join(str(e).split())})") from None
        if opt.get("step") != meta.get("step"):
            raise ValueError(f"{opt_path}: optimizer state is from step {opt.get('step')} but "
                             f"{json_path} says {meta.get('step')}")
    return dict(state=state, ema=ema, meta=meta, opt=opt)

def restore_training_state(ckpt, optimizer, rank=0):
    """Resume: load optimizer state(s) from ckpt["opt"] and restore the saved RNG states.
    Rank 0 continues exactly; other ranks then reseed deterministically so they keep distinct noise."""
    opt = ckpt["opt"]
    if opt is None:
        raise ValueError("checkpoint has no optimizer state (.opt.pt) to resume from")
    if hasattr(optimizer, "load_state_dict"):
        optimizer.load_state_dict(_optimizer_state_like(opt["optimizer"], optimizer))
    else:
        for k, o in optimizer.items():
            o.load_state_dict(_optimizer_state_like(opt["optimizer"][k], o))
    rng = opt["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rank > 0:
        seed_everything(int(torch.randint(2**31, ())), rank)
    return opt["step"]

RUN_CONTROL = ("resume", "overwrite", "stop_after")  # flags that say how this invocation runs, not what is trained


def resume(stem, model, ema=None, optimizer=None, rank=0, config=None):
    """--resume: load weights, EMA, optimizer and RNG from stem if it exists; returns the step (0 if none).
    Anything that would make the continuation inexact (another model config, missing optimizer state)
    stops the run with one line instead; a training flag that differs from the saved run's (config: this
    invocation's) is named in the log, since the command line wins (a longer --max_steps, say)."""
    if not os.path.exists(stem_of(stem) + ".json"):
        log(f"nothing to resume at {stem}; starting fresh")
        return 0
    ck = or_die(load_checkpoint, stem)
    saved, now = ck["meta"].get("model") or {}, _jsonable(getattr(unwrap(model), "cfg", None)) or {}
    changed = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in saved if k in now and saved[k] != now[k]]
    if changed:
        die(f"{stem} was trained with another model config: {', '.join(changed)}; resume with the same flags")
    own = unwrap(model).state_dict()
    missing, unexpected = [k for k in own if k not in ck["state"]], [k for k in ck["state"] if k not in own]
    if missing or unexpected:
        die(f"{stem}: checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    load_weights(model, ck["state"])
    if ema is not None:
        load_weights(ema, ck["ema"] or ck["state"])
    if optimizer is not None and ck["opt"] is None:
        die(f"cannot resume {stem} exactly: {stem_of(stem)}.opt.pt (optimizer and RNG state) is missing; "
            f"--overwrite starts the run over")
    step = restore_training_state(ck, optimizer, rank) if optimizer is not None else ck["meta"]["step"]
    log(f"resumed {stem} at step {step}")
    was, now = ck["meta"].get("config") or {}, _jsonable(config) if config is not None else {}
    moved = [f"--{k}={now[k]!r} (saved run: {was[k]!r})" for k in now
             if k in was and was[k] != now[k] and k not in RUN_CONTROL]
    if moved:
        log(f"resumed with flags that differ from the saved run's: {', '.join(moved)}")
    return step

def setup_training(cfg, net, stem, rank, world, local_rank, device):
    """What a stage trains with: (ema, optimizer, first_step, model). The EMA starts as a frozen copy of
    net, first_step comes from --resume (0 for a fresh run), and model is net wrapped for DDP when
    several processes train (call model in the loss; save and EMA the raw net).

    --fsdp: net and the EMA are sharded in place (`shard`) before the optimizer is built on the shards;
    model is net itself. Resuming reads the same whole-tensor files and cuts them to the shards."""
    ema = frozen_copy(net)
    sharded = getattr(cfg, "fsdp", False) and world > 1
    if getattr(cfg, "fsdp", False) and not sharded:
        log("--fsdp with one process: nothing to shard, training unsharded")
    if sharded:
        shard(net, device)
        shard(ema, device)
    optimizer = adamw(net.parameters(), cfg)
    first_step = resume(stem, net, ema, optimizer, rank, config=cfg) if cfg.resume else 0
    net.grad_ckpt = cfg.grad_ckpt
    model = net if sharded else ddp(net, world, local_rank, device)
    return ema, optimizer, first_step, torch.compile(model) if cfg.compile else model

def ship(src, dst, dtype="fp16"):
    """Copy a trained checkpoint's EMA weights (or raw if none) as a small fp16 file, keeping its JSON
    (the training command included) and noting where it came from. For assets/ (kept under 5 MB).

    dst ending in .pt writes one torch file instead, {"generator_ema": weights, "model_config": ...,
    "stage": ..., "step": ...} (the CausVid / Self-Forcing layout, plus the config), so that
    `torchrun train_ar.py --ckpt=bidir.pt` loads the model it was."""
    ck = load_checkpoint(src, load_opt=False)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tensors = _prepare(ck["ema"] or ck["state"], dt)
    meta = {**ck["meta"], "dtype": dtype, "weights": "ema" if ck["ema"] else "raw", "shipped_from": stem_of(src)}
    os.makedirs(os.path.dirname(str(dst)) or ".", exist_ok=True)
    if str(dst).endswith(".pt"):
        obj = {"generator_ema": tensors, "model_config": meta["model"], "stage": meta["stage"], "step": meta["step"]}
        atomic_write(str(dst), lambda p: torch.save(obj, p))
        return str(dst)
    dst = stem_of(dst)
    header = weights_header(meta["stage"], meta["step"], meta["model"])
    atomic_write(dst + ".safetensors", lambda p: save_file(tensors, p, metadata=header))
    atomic_write(dst + ".json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return dst

# ----------------------------------------------------------------------------- training helpers

def autocast(device):
    """bf16 autocast on CUDA; nothing on CPU (bf16 on CPU is slow and buys nothing here)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

def adamw(params, cfg, lr=None, betas=(0.9, 0.99)):
    """Every stage's optimizer: AdamW with the stage's weight decay (0 by default), lr set per step by set_lr."""
    return torch.optim.AdamW(params, lr=lr or cfg.lr, betas=betas, weight_decay=cfg.weight_decay)

def set_lr(optimizer, cfg, step):
    """Put lr_at(step) (warmup, then cosine from cfg.lr to cfg.min_lr) into the optimizer; returns it."""
    lr = lr_at(step, cfg.warmup, cfg.max_steps, cfg.lr, cfg.min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr

def lr_at(step, warmup, max_steps, max_lr, min_lr):
    """Linear warmup, then cosine decay from max_lr to min_lr at max_steps, min_lr afterwards."""
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup) / (max_steps - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (max_lr - min_lr)

def optimizer_step(loss, optimizer, model, cfg, step, ema=None, average_grads=False):
    """One update of every stage: zero_grad, backward, clip to cfg.grad_clip, step, then the EMA of the
    weights (decay cfg.ema; a plain copy before step cfg.ema_warmup). Returns the gradient norm.

    average_grads: for a model trained without the DDP wrapper (DMD: several forwards of one model
    feed one backward, which DDP's hooks do not allow), so its gradients are averaged here."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if average_grads:
        all_reduce_grads(model)
    norm = _whole(torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), cfg.grad_clip))  # (FSDP: a DTensor)
    optimizer.step()
    if ema is not None:
        update_ema(ema, model, 0.0 if step < cfg.ema_warmup else cfg.ema)
    return norm

@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema = decay * ema + (1 - decay) * param for every parameter; buffers are copied."""
    ema_model, model = unwrap(ema_model), unwrap(model)
    for ema_p, p in zip(ema_model.parameters(), model.parameters()):
        ema_p.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for ema_b, b in zip(ema_model.buffers(), model.buffers()):
        ema_b.copy_(b)

def requires_grad(model, flag=True):
    """Turn gradients on/off for every parameter (EMA, frozen teachers)."""
    for p in model.parameters():
        p.requires_grad_(flag)

def frozen(model):
    """model in eval mode with gradients off (a teacher, a real score); returns it."""
    requires_grad(model, False)
    return model.eval()

def frozen_copy(model):
    """A frozen deep copy of model: the EMA of a stage's weights, a critic's starting point."""
    return frozen(copy.deepcopy(unwrap(model)))

def check_finite(value, what, step):
    """value as a float; a nan/inf stops the run with one line (the last saved checkpoint stays good).
    It syncs with the GPU, so call it where you would call .item() anyway (the log step)."""
    value = float(value)
    if not math.isfinite(value):
        die(f"{what} is {value} at step {step}")
    return value

def last_step(cfg):
    """The step this invocation ends at: --stop_after (an interruption on purpose) or --max_steps."""
    return min(cfg.stop_after or cfg.max_steps, cfg.max_steps)

def end_of_step(cfg, step, bar, t0, scalars, saves):
    """The bookkeeping after optimizer step `step` (counted from 1) in every stage; True when the
    control metric is due (every eval_every steps and at max_steps).

    scalars: {name: number or tensor} - averaged over ranks, checked finite, shown on the bar and
    appended to OUT_DIR/NAME.metrics.jsonl every log_every steps and at the last step.
    saves: a list of save_checkpoint arguments (stem, state_dict, stage, ...), written every
    save_every steps and at the last step of this invocation (so --stop_after leaves a resumable state).
    The bar closes after the last step.
    """
    last = step == last_step(cfg)
    bar.update(1)
    if step % cfg.log_every == 0 or last:
        values = {k: check_finite(all_reduce_mean(v.detach()) if torch.is_tensor(v) else v, k, step)
                  for k, v in scalars.items()}
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
        log_metrics(cfg.out_dir, cfg.name, dict(step=step, **values, time=time.time() - t0))
    if step % cfg.save_every == 0 or last:
        for kw in saves:
            save_checkpoint(config=cfg, step=step, **kw)
    if last:
        bar.close()
    return step % cfg.eval_every == 0 or step == cfg.max_steps


if __name__ == "__main__":  # python common.py ship out/bidir bidir.pt: a small copy to share or to load elsewhere
    args = sys.argv[1:]
    dtype = next((a.split("=", 1)[1] for a in args if a.startswith("--dtype=")), "fp16")
    paths = [a for a in args[1:] if not a.startswith("--dtype=")]
    if args[:1] != ["ship"] or len(paths) != 2 or dtype not in ("fp16", "bf16", "fp32"):
        die("usage: python common.py ship SRC DST [--dtype=fp16|bf16|fp32]  (SRC a checkpoint such as out/bidir; "
            "DST a stem, or a .pt file)")
    check_file(stem_of(paths[0]) + ".json", "checkpoint")
    print(or_die(ship, paths[0], paths[1], dtype))
