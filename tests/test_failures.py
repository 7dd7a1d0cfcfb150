"""Failure behaviour of every command line: bad input ends in one `error:` line and exit 2 that names
the problem, with no traceback, and leaves every file as it was (README, "Failure behaviour")."""
import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

import common
from helpers import ROOT, run


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """A folder of inputs the cases point at: a checkpoint copy, camera files good and bad, bad weights,
    an old video, a quick bidir run to resume and a lone file where a folder should be."""
    d = tmp_path_factory.mktemp("failures")
    for ext in (".safetensors", ".json"):
        shutil.copy(os.path.join(ROOT, "assets", "dmd" + ext), d / ("dmd" + ext))
    good = json.load(open(os.path.join(ROOT, "assets", "orbit.json")))

    def frames_with(i, **change):
        doc = json.loads(json.dumps(good))
        doc["frames"][i].update(change)
        return doc
    files = {
        "f_tiny.json": frames_with(2, K_norm=[1e-30, 1e-30, 0.5, 0.5]),
        "f_huge.json": frames_with(2, K_norm=[1e30, 1e30, 0.5, 0.5]),
        "t_huge.json": frames_with(3, w2c=[[1, 0, 0, 1e30], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        "pp_neg.json": frames_with(1, K_norm=[0.8, 0.8, -0.5, 0.5]),
        "nan.json": None,
    }
    for name, doc in files.items():
        (d / name).write_text(json.dumps(doc) if doc is not None else '{"convention": "opencv", "pose": "w2c", '
                              '"frames": [{"K_norm": [0.8, 0.8, 0.5, 0.5], "w2c": [[NaN, 0, 0, 0], [0, 1, 0, 0], '
                              '[0, 0, 1, 0], [0, 0, 0, 1]]}]}')
    (d / "binary.json").write_bytes(bytes(range(256)) * 4)
    (d / "adir").mkdir()
    (d / "afile").write_text("not a folder")
    (d / "old.mp4").write_bytes(b"an older video the failing run must leave alone")
    sd = {k: v.float() for k, v in common.load_checkpoint(d / "dmd", load_opt=False)["state"].items()}
    torch.save(sd, d / "bare.pt")  # a state dict without its config
    save_file(sd, d / "bare.safetensors")
    (d / "evil.pt").write_bytes(pickle.dumps(os.system))  # a pickle that would run code
    (d / "noise.pt").write_bytes(os.urandom(4096))
    (d / "text.png").write_text("not an image")
    (d / "cams_out.json").write_text(json.dumps(good))
    r = run(["train_bidir.py", "--quick", "--max_steps=2", "--eval_every=100", f"--out_dir={d}/run"])
    assert r.returncode == 0, r.stderr[-1000:]
    shutil.copytree(d / "run", d / "noopt")
    os.remove(d / "noopt" / "bidir.opt.pt")
    return d


def snapshot(d):
    return {str(p): hashlib.md5(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


INFER = ["infer.py", "--ckpt={d}/dmd", "--out={d}/out/v.mp4"]
CASES = [
    # infer.py: sizes, samplers, cache, devices, seeds (issue list, then more)
    (INFER + ["--actions=w*4", "--height=0"], "--height/--width must be"),
    (INFER + ["--actions=w*4", "--fps=0"], "--fps must be"),
    (INFER + ["--actions=w*4", "--sink=0", "--window=0"], "--window must be at least 1"),
    (INFER + ["--actions=w*4", "--window=1"], "shorter than a chunk"),
    (INFER + ["--actions=w*4", "--window=-1"], "--window must be at least 1"),
    (INFER + ["--actions=w*4", "--sink=-1"], "--sink must be"),
    (INFER + ["--actions=w*4", "--device=cuda"], "no CUDA GPU"),
    (INFER + ["--actions=w*4", "--device=foo"], "not a device"),
    (INFER + ["--actions=w*4", "--device=mps"], "only cpu and cuda"),
    (INFER + ["--actions=w*4", "--scene_seed=-1"], "--scene_seed must be"),
    (INFER + ["--actions=w*4", "--seed=-5"], "--seed and --scene_seed must be"),
    (INFER + ["--actions=w*4", "--text_len=-1"], "--text_len must be"),
    (INFER + ["--actions=w*100000000000000000000"], "more than 100000 steps"),
    (INFER + ["--actions=w*4", "--height=4096", "--width=4096"], "1..2048 pixels"),
    (INFER + ["--actions=w*4", "--trans_step=nan"], "must be finite"),
    (INFER + ["--actions=w*4", "--rot_step=inf"], "must be finite"),
    (INFER + ["--actions=w*4", "--sampler=bogus"], "--sampler must be few or euler"),
    (INFER + ["--actions=w*4", "--sampler=euler", "--steps=0"], "--steps must be at least 1"),
    (INFER + ["--actions=w*4", "--sampler=euler", "--steps=-1"], "--steps must be at least 1"),
    (INFER + ["--actions=w*4", "--timesteps="], "at least one timestep"),
    (INFER + ["--actions=w*4", "--timesteps=2000,1000"], "must lie in (0, 1000]"),
    (INFER + ["--actions=w*4", "--timesteps=250,500"], "must decrease"),
    (INFER + ["--actions=w*4", "--timesteps=0"], "must lie in (0, 1000]"),
    (INFER + ["--actions=w*4", "--shift=0"], "--shift must be"),
    (INFER + ["--actions=w*4", "--threads=-1"], "--threads must be"),
    (INFER + ["--actions=w*4", "--height=30"], "multiples of 4"),
    (INFER + ["--actions=w*4", "--height=abc"], "--height expects int"),
    (INFER + ["--actions=w*4", "--windw=8"], "unknown flag --windw (did you mean --window?)"),
    (INFER + ["--actions=w*4", "--cameras={d}/adir"], "give exactly one of"),
    (INFER, "give exactly one of"),
    # infer.py: camera files and action strings
    (INFER + ["--cameras={d}/f_tiny.json"], "f_tiny.json: frames[2].K_norm: focal length"),
    (INFER + ["--cameras={d}/f_huge.json"], "f_huge.json: frames[2].K_norm: focal length"),
    (INFER + ["--cameras={d}/t_huge.json"], "t_huge.json: frames[3].w2c: translation"),
    (INFER + ["--cameras={d}/pp_neg.json"], "pp_neg.json: frames[1].K_norm: principal point"),
    (INFER + ["--cameras={d}/nan.json"], "must be finite"),
    (INFER + ["--cameras={d}/binary.json"], "binary.json"),
    (INFER + ["--cameras={d}/adir"], "is a folder"),
    (INFER + ["--cameras={d}/missing.json"], "--cameras file not found"),
    (INFER + ["--actions=w*²"], "repeat count must be a positive integer"),
    (INFER + ["--actions=w,q"], "unknown action letter 'q'"),
    (INFER + ["--actions=,"], "no action letter"),
    # infer.py: checkpoints and other inputs
    (["infer.py", "--ckpt={d}/evil.pt", "--actions=w", "--out={d}/out/v.mp4"], "not a plain tensor file"),
    (["infer.py", "--ckpt={d}/noise.pt", "--actions=w", "--out={d}/out/v.mp4"], "not a plain tensor file"),
    (["infer.py", "--ckpt={d}/bare.pt", "--actions=w", "--out={d}/out/v.mp4"], "carry no model config"),
    (["infer.py", "--ckpt={d}/bare.safetensors", "--actions=w", "--out={d}/out/v.mp4"], "--model_config=FILE.json"),
    (["infer.py", "--ckpt={d}/nothing", "--actions=w", "--out={d}/out/v.mp4"], "no such file"),
    (INFER + ["--actions=w*4", "--image={d}/missing.png"], "--image not found"),
    (INFER + ["--actions=w*4", "--image={d}/text.png"], "cannot read"),
    (INFER + ["--actions=w*4", "--vae={d}/novae"], "--vae folder not found"),
    (INFER + ["--actions=w*4", "--text_emb={d}/noise.pt"], "not a readable .safetensors"),
    # infer.py: outputs that would clobber inputs or checkpoints, or cannot be written
    (["infer.py", "--ckpt={d}/dmd", "--actions=w*4", "--out={d}/dmd.mp4"], "dmd.json, an input of this run"),
    (["infer.py", "--ckpt={d}/dmd", "--actions=w*4", "--out={d}/run/bidir.mp4"], "bidir.json, a checkpoint's JSON"),
    (["infer.py", "--ckpt={d}/dmd", "--cameras={d}/cams_out.json", "--out={d}/cams_out.gif"], "an input of this run"),
    (INFER[:2] + ["--actions=w*4", "--out={d}/afile/v.mp4"], "is a file, not a folder"),
    (INFER[:2] + ["--actions=w*4", "--out={d}/out/"], "must name a file"),
    (INFER[:2] + ["--actions=w*4", "--out=/proc/minwm/v.mp4"], "cannot make the folder"),
    # training stages: flags
    (["train_bidir.py", "--quick", "--batch_size=0", "--out_dir={d}/t"], "--batch_size=0 must be at least 1"),
    (["train_bidir.py", "--quick", "--height=17", "--out_dir={d}/t"], "multiples of 4"),
    (["train_bidir.py", "--quick", "--lr=nan", "--out_dir={d}/t"], "--lr=nan must be a finite number"),
    (["train_bidir.py", "--quick", "--preset=huge", "--out_dir={d}/t"], "unknown model preset 'huge'"),
    (["train_bidir.py", "--quick", "--prope=foo", "--out_dir={d}/t"], "prope"),
    (["train_bidir.py", "--quick", "--frames=1", "--out_dir={d}/t"], "--frames=1 must be at least 2"),
    (["train_bidir.py", "--quick", "--ema=1.5", "--out_dir={d}/t"], "--ema=1.5 must be in [0, 1)"),
    (["train_bidir.py", "--quick", "--text_drop=2", "--out_dir={d}/t"], "--text_drop=2.0 must be in [0, 1]"),
    (["train_bidir.py", "--quick", "--reveal=1.5", "--out_dir={d}/t"], "--reveal=1.5 must be in [0, 1]"),
    (["train_bidir.py", "--quick", "--warmup=-1", "--out_dir={d}/t"], "--warmup=-1 must be at least 0"),
    (["train_bidir.py", "--quick", "--device=cuda:7", "--out_dir={d}/t"], "no CUDA GPU"),
    (["train_bidir.py", "--quick", "--init={d}/bare.pt", "--out_dir={d}/t"], "carry no model config"),
    # training stages: checkpoints that must not be replaced, resumes that would not be exact
    (["train_bidir.py", "--quick", "--out_dir={d}/run"], "already holds a checkpoint"),
    (["train_bidir.py", "--quick", "--resume", "--overwrite", "--out_dir={d}/run"], "contradict"),
    (["train_bidir.py", "--quick", "--resume", "--out_dir={d}/noopt"], "bidir.opt.pt (optimizer and RNG state) is missing"),
    (["train_bidir.py", "--quick", "--resume", "--prope=branch", "--out_dir={d}/run"], "prope='inline' (now 'branch')"),
    (["train_ar.py", "--quick", "--chunk=0", "--ckpt={d}/run/bidir", "--out_dir={d}/t"], "--chunk=0 must be at least 1"),
    (["train_ar.py", "--quick", "--chunk=3", "--ckpt={d}/run/bidir", "--out_dir={d}/t"], "divide --frames=4"),
    (["train_ar.py", "--quick", "--ckpt={d}/run/ar", "--out_dir={d}/run"], "this run's own output"),
    (["train_ar.py", "--quick", "--ckpt={d}/bare.pt", "--out_dir={d}/t"], "carry no model config"),
    (["train_ar.py", "--quick", "--ckpt={d}/missing", "--out_dir={d}/t"], "no such file"),
    (["train_dmd.py", "--quick", "--ckpt={d}/dmd", "--teacher={d}/evil.pt", "--out_dir={d}/t"], "not a plain tensor"),
    (["train_dmd.py", "--quick", "--ckpt={d}/dmd", "--window_cond=mine", "--out_dir={d}/t"], "--window_cond=mine must be"),
    (["train_dmd.py", "--quick", "--ckpt={d}/dmd", "--anchor=-1", "--out_dir={d}/t"], "--anchor=-1.0 must be at least 0"),
    (["train_dmd.py", "--quick", "--ckpt={d}/dmd", "--anchor_frames=all", "--out_dir={d}/t"], "--anchor_frames=all must be"),
    (["train_dmd.py", "--quick", "--ckpt={d}/dmd", "--anchor_on=seen", "--out_dir={d}/t"], "--anchor_on=seen must be"),
    (["train_ar.py", "--quick", "--context_sigma=-1", "--ckpt={d}/run/bidir", "--out_dir={d}/t"], "--context_sigma=-1.0 must be in [0, 1]"),
    (["train_ode.py", "--quick", "--ckpt={d}/dmd", "--ode_steps=7", "--out_dir={d}/t"], "does not put grid points"),
    # the few-step stages took any --timesteps and trained a sampler no one asked for
    (["train_cd.py", "--quick", "--ckpt={d}/dmd", "--timesteps=250,500", "--out_dir={d}/t"], "--timesteps must decrease"),
    (["train_dmd.py", "--quick", "--ckpt={d}/dmd", "--timesteps=2000,1000", "--out_dir={d}/t"], "must lie in (0, 1000]"),
    (["train_ode.py", "--quick", "--ckpt={d}/dmd", "--timesteps=", "--out_dir={d}/t"], "at least one timestep"),
    # tools
    (["metric.py", "plot", "{d}/run", "missing_name"], "training log not found"),
    (["metric.py", "table", "{d}/nowhere"], "no such folder"),
    (["metric.py", "long", "--ckpts=", "--out={d}/out/l"], "give --ckpts"),
    (["metric.py", "still", "--frames=4", "--ckpts={d}/dmd"], "--frames >= 8"),
    (["metric.py", "long", "--draws=0", "--ckpts={d}/dmd", "--out={d}/out/l"], "--draws >= 1"),
    (["metric.py", "long", "--first_clip=-1", "--ckpts={d}/dmd", "--out={d}/out/l"], "--first_clip >= 0"),
    (["metric.py", "long", "--ckpts={d}/dmd,{d}/dmd", "--out={d}/out/l"], "given twice"),
    (["metric.py", "long", "--ckpts=assets/bidir", "--frames=16", "--out={d}/out/l"], "give --frames <= 8"),
    (["metric.py", "long", "--context=dream", "--ckpts={d}/dmd", "--out={d}/out/l"], "--context one of own|truth|shown"),
    (["metric.py", "long", "--caption=red", "--ckpts={d}/dmd", "--out={d}/out/l"], "--caption one of true|purple|none"),
    (["metric.py", "long", "--timesteps=500,1000", "--ckpts={d}/dmd", "--out={d}/out/l"], "--timesteps must decrease"),
    (["metric.py", "still", "--context=truth", "--ckpts={d}/dmd"], "--context is an oracle of long rollouts"),
    (["metric.py", "still", "--ckpts={d}/missing"], "no such file"),
    (["metric.py", "control", "--ckpts={d}/missing", "--out={d}/out/c"], "no such file"),
    (["metric.py", "control", "--ckpts=", "--out={d}/out/c"], "give --ckpts"),
    (["metric.py", "control", "--clips=-1", "--ckpts={d}/dmd", "--out={d}/out/c"], "--clips >= 0"),
    (["metric.py", "control", "--ckpts={d}/dmd,{d}/dmd", "--out={d}/out/c"], "given twice"),
    (["train_dmd.py", "--quick", "--warmup=5", "--out_dir={d}/t"], "--warmup does not apply to train_dmd.py"),
    (["metric.py", "bogus"], "usage: python metric.py"),
    (["common.py", "ship", "{d}/missing", "{d}/x"], "checkpoint not found"),
    (["common.py", "ship", "{d}/dmd", "{d}/x", "--dtype=int8"], "usage: python common.py ship"),
    (["bench.py", "--preset=huge"], "--preset=huge: bench.py measures"),
    (["bench.py", "--repeats=0"], "--repeats and --batch_size must be"),
    (["play.py", "--port=70000"], "--port must be in 0..65535"),
    (["play.py", "--window=1"], "shorter than a chunk"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[f"{a[0]}:{' '.join(a[1:])[-40:]}" for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(box, args, message):
    before = snapshot(box)
    r = run([a.format(d=box) for a in args])
    after = snapshot(box)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert not changed, f"files changed or appeared: {sorted(changed)}"
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    assert r.returncode == 2, (r.returncode, r.stderr[-800:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-800:]


def test_a_bidir_pt_made_by_ship_trains_stage_1(box):
    """The user's own command: `torchrun train_ar.py --ckpt bidir.pt` with a .pt from `common.py ship`."""
    r = run(["common.py", "ship", f"{box}/run/bidir", f"{box}/pt/bidir.pt"])
    assert r.returncode == 0, r.stderr[-800:]
    r = run(["train_ar.py", "--quick", f"--ckpt={box}/pt/bidir.pt", "--max_steps=1", "--eval_every=100",
             f"--out_dir={box}/pt"])
    assert r.returncode == 0, r.stderr[-800:]
    ck = common.load_checkpoint(f"{box}/pt/ar", load_opt=False)
    trained = common.load_checkpoint(f"{box}/run/bidir", load_opt=False)["meta"]["model"]
    assert {k: ck["meta"]["model"][k] for k in ("num_heads", "prope")} == {k: trained[k] for k in ("num_heads", "prope")}


def test_a_lone_safetensors_loads_as_the_model_it_was(box, tmp_path):
    import model as M
    shutil.copy(box / "dmd.safetensors", tmp_path / "w.safetensors")  # no JSON beside it
    r = run(["common.py", "ship", f"{box}/run/bidir", f"{tmp_path}/lone"])
    assert r.returncode == 0, r.stderr[-500:]
    os.remove(tmp_path / "lone.json")
    lone = M.load_pretrained(tmp_path / "lone.safetensors")
    assert (lone.cfg.num_heads, lone.cfg.prope) == (2, "inline")


def test_a_killed_infer_leaves_the_old_video(box, tmp_path):
    """SIGKILL mid-stream: the older video and its report stay as they were (the new ones were temporary)."""
    import signal
    import subprocess
    import sys
    import time
    for ext, data in ((".mp4", b"old video"), (".json", b'{"old": "report"}')):
        (tmp_path / ("v" + ext)).write_bytes(data)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "infer.py", f"--ckpt={box}/dmd", "--actions=w*3000", f"--out={tmp_path}/v.mp4"],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not [f for f in os.listdir(tmp_path) if ".tmp" in f]:
        time.sleep(0.2)
    time.sleep(1.0)  # a few chunks into the stream
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / "v.mp4").read_bytes() == b"old video"
    assert (tmp_path / "v.json").read_bytes() == b'{"old": "report"}'
