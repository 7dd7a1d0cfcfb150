"""Tests for common.py: config overrides, checkpoint IO, schedules, EMA, single-process DDP."""
import json
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common


@dataclass
class Cfg:
    a: int = 1
    b: float = 0.5
    flag: bool = False
    name: str = "default"
    max_lr: float = 1e-3
    steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    resume: str | None = None
    preset: str = ""
    out_dir: str = "out"


PRESETS = {"tiny": {"a": 7, "name": "tiny-name"}, "big": {"a": 100, "b": 9.0}}


def exit_code_and_err(capsys, argv, presets=None):
    with pytest.raises(SystemExit) as e:
        common.parse_config(Cfg, argv, presets)
    return e.value.code, capsys.readouterr()


# ----------------------------------------------------------------------------- parse_config

def test_parse_both_syntaxes_and_bare_bool():
    cfg = common.parse_config(Cfg, ["--a=3", "--b", "2.5", "--flag", "--name=x"])
    assert (cfg.a, cfg.b, cfg.flag, cfg.name) == (3, 2.5, True, "x")
    assert isinstance(cfg.a, int) and isinstance(cfg.b, float)
    assert common.parse_config(Cfg, []) == Cfg()


def test_parse_bool_values_lists_optional_and_instances():
    assert common.parse_config(Cfg, ["--flag=false"]).flag is False
    assert common.parse_config(Cfg, ["--flag", "0", "--a", "4"]).flag is False
    cfg = common.parse_config(Cfg(flag=True), ["--flag=1", "--steps=8,4", "--resume", "out/ar"])
    assert cfg.flag is True and cfg.steps == [8, 4] and cfg.resume == "out/ar"
    assert common.parse_config(Cfg, ["--steps=[1, 2]", "--resume=none"]).steps == [1, 2]
    assert common.parse_config(Cfg, ["--a=1e4", "--b=-3", "--max-lr", "2e-4"]).a == 10000
    base = Cfg(a=5)
    common.parse_config(base, ["--a=6"])
    assert base.a == 5  # the caller's instance is not modified


def test_preset_then_explicit_flags():
    cfg = common.parse_config(Cfg, ["--a=3", "--preset=tiny"], PRESETS)
    assert (cfg.preset, cfg.a, cfg.name) == ("tiny", 3, "tiny-name")  # flag beats preset, order-free
    cfg = common.parse_config(Cfg(preset="big"), [], PRESETS)  # the default preset applies too
    assert (cfg.a, cfg.b) == (100, 9.0)


def test_unknown_preset(capsys):
    code, out = exit_code_and_err(capsys, ["--preset=tinny"], PRESETS)
    assert code == 2 and out.err.startswith("error:") and "'tiny'" in out.err


def test_unknown_flag_suggests(capsys):
    code, out = exit_code_and_err(capsys, ["--lr_max=1"])
    assert code == 2
    assert out.err == "error: unknown flag --lr_max (did you mean --max_lr?)\n"


def test_a_flag_a_stage_refuses_names_why(capsys):  # train_dmd.py: constant learning rates, no schedule flags
    import train_dmd
    for flag in ("--warmup=5", "--min-lr=1e-6"):
        with pytest.raises(SystemExit) as e:
            common.parse_config(train_dmd.Config, [flag])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "does not apply" in err and "constant" in err
    cfg = common.parse_config(train_dmd.Config, ["--lr=1e-4"])
    assert cfg.lr == 1e-4 and cfg.warmup == common.StageConfig.warmup  # still there, for the saved config


def test_wrong_type(capsys):
    code, out = exit_code_and_err(capsys, ["--a=ten"])
    assert code == 2 and out.err == "error: --a expects int, got 'ten'\n"
    code, out = exit_code_and_err(capsys, ["--a=2.5"])
    assert code == 2 and "expects int" in out.err
    code, out = exit_code_and_err(capsys, ["--flag=maybe"])
    assert code == 2 and "--flag expects bool" in out.err
    code, out = exit_code_and_err(capsys, ["--a"])
    assert code == 2 and out.err == "error: --a expects int, got nothing\n"
    code, out = exit_code_and_err(capsys, ["stray"])
    assert code == 2 and out.err.count("\n") == 1


def test_help_lists_flags_and_defaults(capsys):
    code, out = exit_code_and_err(capsys, ["--a=3", "--help"], PRESETS)
    assert code == 0
    for line in ("--a", "int", "--max_lr", "0.001", "--flag", "bool", "[1000, 750, 500, 250]",
                 "'out'", "tiny, big"):
        assert line in out.out


def test_die_and_check_file(capsys, tmp_path):
    assert common.check_file(str(tmp_path), "dir") == str(tmp_path)
    with pytest.raises(SystemExit) as e:
        common.check_file(str(tmp_path / "nope.safetensors"), "teacher checkpoint")
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: teacher checkpoint not found: {tmp_path}/nope.safetensors\n"


# ----------------------------------------------------------------------------- checkpoints

def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def train_a_step(model, opt):
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()


def test_round_trip_bit_exact_with_ema_and_optimizer(tmp_path):
    model, ema = tiny_model(), tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_a_step(model, opt)
    common.update_ema(ema, model, 0.9)
    stem = str(tmp_path / "sub" / "ar")
    common.save_checkpoint(stem, model.state_dict(), config=Cfg(), stage="ar", step=12, parent="out/bidir",
                           model_config={"dim": 8, "shape": (4, 8)}, ema_state=ema, optimizer=opt,
                           extra={"loss": 0.25})
    assert sorted(os.listdir(tmp_path / "sub")) == ["ar.json", "ar.opt.pt", "ar.safetensors"]  # no temp files
    rng_after_save = torch.rand(3)
    for path in (stem, stem + ".safetensors", stem + ".json"):
        ck = common.load_checkpoint(path)
        assert ck["state"].keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert torch.equal(ck["state"][k], v) and ck["state"][k].dtype == torch.float32
            assert torch.equal(ck["ema"][k], ema.state_dict()[k])
    meta = ck["meta"]
    assert meta["config"]["steps"] == [1000, 750, 500, 250] and meta["model"]["shape"] == [4, 8]
    assert (meta["stage"], meta["step"], meta["parent"], meta["loss"]) == ("ar", 12, "out/bidir", 0.25)
    assert "command" in meta
    # resume: a fresh optimizer gets the same state and the RNG continues where the save left it
    model2 = tiny_model()
    model2.load_state_dict(ck["state"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    torch.manual_seed(999)
    assert common.restore_training_state(ck, opt2) == 12
    assert torch.equal(torch.rand(3), rng_after_save)
    for s1, s2 in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert common.load_checkpoint(stem, load_opt=False)["opt"] is None


def test_fp16_cast_tied_weights_and_stale_optimizer(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stem = str(tmp_path / "dmd")
    common.save_checkpoint(stem, model.state_dict(), config={}, stage="dmd", step=1, optimizer=opt)
    state = dict(model.state_dict())
    state["tied.weight"] = state["0.weight"]  # shared storage, which safetensors refuses as is
    state["half"] = state["2.weight"][:1]  # a view into another tensor's storage
    common.save_checkpoint(stem, state, config={}, stage="dmd", step=2, dtype="fp16")
    assert not os.path.exists(stem + ".opt.pt")  # step-1 optimizer must not survive step-2 weights
    ck = common.load_checkpoint(stem)
    assert ck["opt"] is None and ck["ema"] is None and ck["meta"]["step"] == 2
    for k, v in state.items():
        assert ck["state"][k].dtype == torch.float16
        assert torch.equal(ck["state"][k], v.half())


def test_failed_write_leaves_old_files_and_no_temp(tmp_path):
    stem = str(tmp_path / "ar")
    common.save_checkpoint(stem, tiny_model().state_dict(), config={}, stage="ar", step=1)
    with pytest.raises(Exception):
        common.save_checkpoint(stem, {"x": "not a tensor"}, config={}, stage="ar", step=2)
    assert sorted(os.listdir(tmp_path)) == ["ar.json", "ar.safetensors"]
    assert common.load_checkpoint(stem)["meta"]["step"] == 1


def test_corrupt_and_missing_files(tmp_path):
    stem = str(tmp_path / "bidir")
    with pytest.raises(ValueError, match="bidir.json: file not found"):
        common.load_checkpoint(stem)
    common.save_checkpoint(stem, tiny_model().state_dict(), config={}, stage="bidir", step=3)
    size = os.path.getsize(stem + ".safetensors")
    with open(stem + ".safetensors", "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=r"bidir\.safetensors") as e:
        common.load_checkpoint(stem)
    assert "\n" not in str(e.value)
    os.remove(stem + ".safetensors")
    with pytest.raises(ValueError, match=r"bidir\.safetensors: file not found"):
        common.load_checkpoint(stem + ".json")
    common.save_checkpoint(stem, tiny_model().state_dict(), config={}, stage="bidir", step=3)
    with open(stem + ".json", "w") as f:
        f.write('{"config": ')
    with pytest.raises(ValueError, match=r"bidir\.json: invalid JSON"):
        common.load_checkpoint(stem)
    with open(stem + ".json", "w") as f:  # weights newer than the JSON: an interrupted save
        json.dump({"step": 2}, f)
    with pytest.raises(ValueError, match="step 3"):
        common.load_checkpoint(stem)


# ----------------------------------------------------------------------------- helpers

def test_lr_at_warmup_and_cosine():
    kw = dict(warmup=10, max_steps=110, max_lr=1.0, min_lr=0.1)
    assert common.lr_at(0, **kw) == pytest.approx(1 / 11)
    assert common.lr_at(9, **kw) == pytest.approx(10 / 11)
    assert common.lr_at(10, **kw) == pytest.approx(1.0)
    assert common.lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert common.lr_at(110, **kw) == pytest.approx(0.1) and common.lr_at(500, **kw) == 0.1
    assert common.lr_at(5, warmup=0, max_steps=5, max_lr=1.0, min_lr=0.0) == 0.0


def test_update_ema_and_requires_grad():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        ema.weight.fill_(1.0), ema.bias.fill_(0.0), model.weight.fill_(3.0), model.bias.fill_(-1.0)
    common.requires_grad(ema, False)
    common.update_ema(ema, model, decay=0.75)
    assert torch.allclose(ema.weight, torch.full((2, 2), 1.5))  # 0.75 * 1 + 0.25 * 3
    assert torch.allclose(ema.bias, torch.full((2,), -0.25))
    assert not any(p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_check_finite(capsys):
    assert common.check_finite(torch.tensor(0.5), "loss", 3) == 0.5
    with pytest.raises(SystemExit) as e:
        common.check_finite(torch.tensor(float("nan")), "loss", 123)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: loss is nan at step 123\n"


def test_end_of_step_logs_saves_and_says_when_to_evaluate(tmp_path):
    cfg = common.StageConfig(out_dir=str(tmp_path), max_steps=12, log_every=5, save_every=4, eval_every=6, stop_after=10)
    cfg.name = "x"
    model = torch.nn.Linear(2, 2)
    saves = [dict(stem=str(tmp_path / "x"), state_dict=model, stage="x")]
    bar, evals = common.progress(12), []
    for step in range(1, common.last_step(cfg) + 1):
        if common.end_of_step(cfg, step, bar, 0.0, dict(loss=torch.tensor(1.0 / step), lr=0.1), saves):
            evals.append(step)
        if step == 5:
            assert common.load_checkpoint(tmp_path / "x")["meta"]["step"] == 4
    assert evals == [6] and common.last_step(cfg) == 10
    rows = [json.loads(line) for line in open(tmp_path / "x.metrics.jsonl")]
    assert [r["step"] for r in rows] == [5, 10] and rows[0]["loss"] == pytest.approx(0.2) and rows[0]["lr"] == 0.1
    assert common.load_checkpoint(tmp_path / "x")["meta"]["step"] == 10  # the last step of a --stop_after run


def test_setup_ddp_single_process(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    rank, local_rank, world_size, device = common.setup_ddp("cpu")
    assert (rank, local_rank, world_size, device) == (0, 0, 1, torch.device("cpu"))
    assert not dist.is_initialized() and common.is_main()
    x = torch.tensor([1.0, 3.0])
    assert common.all_reduce_mean(x) is x
    assert common.unwrap(torch.nn.Linear(1, 1)).__class__ is torch.nn.Linear
    common.cleanup_ddp()


def test_seed_and_logging(tmp_path, capsys):
    common.seed_everything(5, rank=1)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    common.seed_everything(6)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())
    common.set_log_file(str(tmp_path / "run" / "log.txt"))
    try:
        common.log("step 1 loss 0.5")
        assert list(common.progress(range(3), desc="x")) == [0, 1, 2]
    finally:
        common.set_log_file(None)
    assert "step 1 loss 0.5" in capsys.readouterr().out
    assert (tmp_path / "run" / "log.txt").read_text() == "step 1 loss 0.5\n"


def test_input_text_len_a_later_stage_reads_the_caption_as_its_input_learnt_it(tmp_path):
    (tmp_path / "long.json").write_text(json.dumps({"config": {"text_len": 32}}))
    (tmp_path / "old.json").write_text(json.dumps({"config": {}}))
    assert common.input_text_len(str(tmp_path / "long")) == 32
    assert common.input_text_len(str(tmp_path / "long.safetensors")) == 32
    assert common.input_text_len(str(tmp_path / "old")) == common.TEXT_LEN  # records none
    assert common.input_text_len(str(tmp_path / "missing")) == common.input_text_len("") == common.TEXT_LEN
    assert common.input_text_len("assets/dmd") == 16  # the shipped chain's
