#!/usr/bin/env bash
# The whole minWM pipeline on the embedded procedural world, one stage after another:
#   bidir (Phase 1) -> ar (Stage 1) -> ode (Stage 2a) and cd (Stage 2b) -> dmd32, dmd (Stage 3, from cd) -> infer
# Stage 3 runs in two passes of train_dmd.py: dmd32, 600 steps on 32-frame self-rollouts; then dmd, 200 steps
# on 64-frame ones with a fresh critic and the colour anchor (--anchor=5): README, Long rollouts.
#
#   bash pipeline.sh                 the full tiny chain (2-core CPU; README, Results, gives its measured time)
#   bash pipeline.sh --quick         every stage at smoke size (minutes)
#   bash pipeline.sh --from=ar       start at a stage; the earlier stages' checkpoints: this run's, else assets/
#   bash pipeline.sh --bidir=assets/bidir_default --from=ar   ... with this Phase 1 checkpoint as the start
#   bash pipeline.sh --cd | --ode    one Stage 2 only (dmd32 from it); the default runs both, dmd32 from cd
#   bash pipeline.sh --ship          also copy each checkpoint (EMA, fp16) into assets/ (bidir too, when given)
#   bash pipeline.sh --overwrite     start over in an out_dir that holds checkpoints (else each stage refuses)
#   bash pipeline.sh --resume        continue the stages from their last saves
#   bash pipeline.sh --preset=tiny-mmdit --out_dir=out_mmdit    the same chain on another model preset
#                                    (Phase 1 builds it; every later stage reads it from the checkpoint)
# Outputs go to --out_dir (default out/, out_quick/ with --quick); the results table to OUT/results.md,
# the long-rollout table, curves and frames to OUT/long_rollout{.md,.png,_frames.png}, the total run time to
# OUT/time.txt: each invocation (a killed one too) appends its wall time to OUT/time.log, so a chain finished
# by --resume reports the sum over its invocations.
set -euo pipefail
cd "$(dirname "$0")"
QUICK="" OUT="" FROM=bidir STAGE2=(ode cd) DMD_FROM=cd SHIP="" AGAIN="" PRESET=() BIDIR=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=--quick ;;
    --cd) STAGE2=(cd) DMD_FROM=cd ;;
    --ode) STAGE2=(ode) DMD_FROM=ode ;;
    --ship) SHIP=1 ;;
    --overwrite|--resume) AGAIN="$arg" ;;
    --from=*) FROM="${arg#--from=}" ;;
    --bidir=*) BIDIR="${arg#--bidir=}" ;;
    --preset=*) PRESET=("$arg") ;;
    --out_dir=*) OUT="${arg#--out_dir=}" ;;
    *) echo "error: unknown option $arg (see the header of pipeline.sh)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$([ -n "$QUICK" ] && echo out_quick || echo out)}"
STAGES=(bidir ar "${STAGE2[@]}" dmd32 dmd)
case " ${STAGES[*]} " in *" $FROM "*) ;; *) echo "error: --from=$FROM is not one of: ${STAGES[*]}" >&2; exit 2 ;; esac
if [ -n "$BIDIR" ] && [ ! -f "${BIDIR%.safetensors}.safetensors" ]; then
  echo "error: --bidir=$BIDIR: no such checkpoint" >&2; exit 2
fi
mkdir -p "$OUT"
start=$(date +%s)
[ "$AGAIN" = --overwrite ] && rm -f "$OUT/time.log"  # a chain started over starts its time over
record() {  # this invocation's wall time, whatever ended it; time.txt: the sum over the chain's invocations
  echo "$(date -u +%FT%TZ) $(( $(date +%s) - start )) s: pipeline.sh $*" >> "$OUT/time.log"
  awk '{s += $2; n++} END {printf "pipeline.sh: %d minutes%s\n", s / 60, (n > 1 ? " (" n " invocations, --resume)" : "")}' \
    "$OUT/time.log" > "$OUT/time.txt"
}
trap 'record "$@"' EXIT
trap 'exit 143' TERM INT HUP  # a stopped chain still records the time it ran (then --resume continues it)

ckpt() {  # the checkpoint of stage $1: this run's if it made it, else --bidir for Phase 1, else the shipped one
  if [ -f "$OUT/$1.safetensors" ]; then echo "$OUT/$1"
  elif [ "$1" = bidir ] && [ -n "$BIDIR" ]; then echo "${BIDIR%.safetensors}"
  else echo "assets/$1"; fi
}
if [ -n "$SHIP" ] && [ -n "$BIDIR" ]; then  # the chain's Phase 1 is shipped as assets/bidir and used from there
  python common.py ship "$BIDIR" assets/bidir && BIDIR=assets/bidir
fi
started=""
for stage in "${STAGES[@]}"; do
  [ "$stage" = "$FROM" ] && started=1
  [ -z "$started" ] && continue
  case "$stage" in
    bidir) args=(${PRESET[@]+"${PRESET[@]}"}) ;;
    ar) args=(--ckpt="$(ckpt bidir)") ;;
    ode|cd) args=(--ckpt="$(ckpt ar)") ;;
    dmd32) args=(--ckpt="$(ckpt "$DMD_FROM")" --teacher="$(ckpt bidir)" --name=dmd32) ;;
    # the second pass: its --quick keeps the smoke size's steps and rollout
    dmd) args=(--ckpt="$(ckpt dmd32)" --teacher="$(ckpt bidir)" --anchor=5
               $([ -n "$QUICK" ] || echo "--rollout_frames=64 --max_steps=200")) ;;
  esac
  script="train_${stage%32}.py"  # dmd32: train_dmd.py
  echo "== $stage: python $script ${args[*]} $QUICK $AGAIN --out_dir=$OUT"
  python "$script" "${args[@]}" $QUICK $AGAIN --out_dir="$OUT"
  if [ -n "$SHIP" ]; then python common.py ship "$OUT/$stage" "assets/$stage"; fi
done

echo "== infer and the long rollouts"
python infer.py --ckpt="$(ckpt dmd)" --cameras=assets/orbit.json --out="$OUT/infer_orbit.mp4" \
  $([ -n "$QUICK" ] && echo "--height=16 --width=16")
python metric.py table "$OUT" | tee "$OUT/results.md"
echo "first-chunk latency: $(python -c "import json; print(round(1000 * json.load(open('$OUT/infer_orbit.json'))['first_chunk_latency_s']), 'ms')")" | tee -a "$OUT/results.md"
present=$(for s in ar ode cd dmd32 dmd; do [ -f "$OUT/$s.safetensors" ] && printf '%s,' "$OUT/$s"; done)
python metric.py long --ckpts="${present%,}" --out="$OUT/long_rollout" \
  $([ -n "$QUICK" ] && echo "--frames=16 --clips=2 --steps=3" || echo "--frames=512") > /dev/null
trap - EXIT && record "$@" && cat "$OUT/time.txt"
