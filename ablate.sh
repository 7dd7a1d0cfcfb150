#!/usr/bin/env bash
# The paper's findings as numbers, on the embedded world with its exact cameras and ground truth:
#   camera quality  Phase 1 on exact poses vs perception-like poses (jitter of rotation and translation,
#                   and a translation scale drifting along the clip), at three levels
#   training steps  the control metric along the exact-pose run (every EVAL steps)
#   batch size      Phase 1 at batch 2, 4, 8, 16 with the same number of samples seen, and with the same
#                   number of updates (control arrives after a number of updates more than of samples)
#   latency         bench.py: bidirectional 50 steps vs AR 25 steps vs AR 4 steps, time to the first frames
#   stages          bidir -> ar -> ode, cd -> dmd32 -> dmd: one pipeline.sh chain, ODE and CD side by side
#
#   bash ablate.sh --quick           every run at smoke size (about 15 minutes on 2 CPU cores): checks the code
#   bash ablate.sh                   the full study (17 hours of one CPU core, measured; OUT/ablation.md's "Run time" sums
#                                    what each run logged, so a study resumed over several invocations is measured too)
#   bash ablate.sh --out_dir=DIR     where the runs and the tables go (default ablate/, ablate_quick/ with --quick)
# The tables land in OUT/ablation.md (python metric.py ablation OUT); each run keeps its log and checkpoint, and a
# cut-off study continues where it stopped when run again with the same flags.
set -euo pipefail
cd "$(dirname "$0")"
QUICK="" OUT=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --out_dir=*) OUT="${arg#--out_dir=}" ;;
    *) echo "error: unknown option $arg (see the header of ablate.sh)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$([ -n "$QUICK" ] && echo ablate_quick || echo ablate)}"
if [ -n "$QUICK" ]; then  # smoke size: the numbers mean nothing, the code paths are all exercised
  STEPS=80 EVAL=40 BASE=(--eval_clips=8 --sample_steps=10 --warmup=10 --ema_warmup=10 --save_every=1000)
else  # the default Phase 1 recipe (train_bidir.py) at the 9,000 steps it had when these ran (17,000 now): batch 4,
  #     control measured every 1,000
  STEPS=9000 EVAL=1000 BASE=(--save_every=1000)
fi
SAMPLES=$((4 * STEPS))  # the default run's samples seen
mkdir -p "$OUT"
start=$(date +%s)

bidir() {  # bidir RUN FLAGS...: one Phase 1 run in OUT/RUN (continued if it was cut off)
  local run="$1"; shift
  local again=""
  [ -f "$OUT/$run/bidir.json" ] && again=--resume
  echo "== $run: python train_bidir.py $* $again"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python train_bidir.py "${BASE[@]}" --eval_every=$EVAL "$@" $again \
    --out_dir="$OUT/$run" > "$OUT/$run.out" 2>&1 || { tail -3 "$OUT/$run.out" >&2; exit 1; }
}

# camera quality (cam_exact is also the training-steps curve and the batch-4 run of both budgets)
bidir cam_exact --max_steps=$STEPS
bidir cam_low --max_steps=$STEPS --camera_noise=0.01 --camera_scale_drift=0.05
bidir cam_mid --max_steps=$STEPS --camera_noise=0.03 --camera_scale_drift=0.15
bidir cam_high --max_steps=$STEPS --camera_noise=0.08 --camera_scale_drift=0.3
# batch size: equal samples seen (4 x STEPS), and equal updates (STEPS)
for b in 2 8 16; do
  bidir batch_samples_$b --batch_size=$b --max_steps=$((SAMPLES / b)) --eval_every=$((SAMPLES / b / (STEPS / EVAL)))
  bidir batch_updates_$b --batch_size=$b --max_steps=$STEPS
done
for budget in samples updates; do  # batch 4 is the exact-pose run under both budgets
  mkdir -p "$OUT/batch_${budget}_4" && cp "$OUT/cam_exact/bidir."{json,metrics.jsonl} "$OUT/batch_${budget}_4/"
done
# latency, side by side in one run
python bench.py $([ -n "$QUICK" ] && echo --quick || true) --json | tail -1 > "$OUT/bench.json"
# through the stages: the chain from the exact-pose Phase 1 run (the shipped recipe's), ar -> ode, cd -> dmd32 -> dmd
mkdir -p "$OUT/chain"
cp "$OUT/cam_exact/bidir."{json,safetensors,metrics.jsonl} "$OUT/chain/"
bash pipeline.sh $([ -n "$QUICK" ] && echo --quick || true) --from=ar --out_dir="$OUT/chain" --resume > "$OUT/chain.out" 2>&1

python metric.py ablation "$OUT" > /dev/null
echo "ablate.sh: $(( ($(date +%s) - start) / 60 )) minutes; tables in $OUT/ablation.md"
