#!/usr/bin/env bash
# The whole minWM pipeline on the embedded procedural world, one stage after another:
#   bidir (Phase 1) -> ar (Stage 1) -> ode (Stage 2a; --cd: cd, Stage 2b) -> dmd (Stage 3) -> infer
#
#   bash pipeline.sh                 the full tiny pipeline (2-core CPU, ~2-2.5 h); assets/ came from the same
#                                    scripts run stage by stage (each JSON holds its command), dmd from cd (--cd)
#   bash pipeline.sh --quick         every stage at smoke size (minutes)
#   bash pipeline.sh --from=ar       start at a stage, taking the earlier stages' checkpoints from assets/
#   bash pipeline.sh --ship          also copy each trained checkpoint (EMA, fp16) into assets/
#   bash pipeline.sh --overwrite     start over in an out_dir that holds checkpoints (else each stage refuses)
#   bash pipeline.sh --resume        continue the stages from their last saves
#   bash pipeline.sh --preset=tiny-mmdit --out_dir=out_mmdit    the same chain on another model preset
#                                    (Phase 1 builds it; every later stage reads it from the checkpoint)
# Outputs go to --out_dir (default out/, out_quick/ with --quick); the results table to OUT/results.md.
set -euo pipefail
cd "$(dirname "$0")"
QUICK="" OUT="" FROM=bidir DISTILL=ode SHIP="" AGAIN="" PRESET=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=--quick ;;
    --cd) DISTILL=cd ;;
    --ship) SHIP=1 ;;
    --overwrite|--resume) AGAIN="$arg" ;;
    --from=*) FROM="${arg#--from=}" ;;
    --preset=*) PRESET=("$arg") ;;
    --out_dir=*) OUT="${arg#--out_dir=}" ;;
    *) echo "error: unknown option $arg (see the header of pipeline.sh)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$([ -n "$QUICK" ] && echo out_quick || echo out)}"
STAGES=(bidir ar "$DISTILL" dmd)
case " ${STAGES[*]} " in *" $FROM "*) ;; *) echo "error: --from=$FROM is not one of: ${STAGES[*]}" >&2; exit 2 ;; esac
mkdir -p "$OUT"

ckpt() {  # the checkpoint of stage $1: this run's if it made it, else the shipped one
  if [ -f "$OUT/$1.safetensors" ]; then echo "$OUT/$1"; else echo "assets/$1"; fi
}
started=""
for stage in "${STAGES[@]}"; do
  [ "$stage" = "$FROM" ] && started=1
  [ -z "$started" ] && continue
  case "$stage" in
    bidir) args=(${PRESET[@]+"${PRESET[@]}"}) ;;
    ar) args=(--ckpt="$(ckpt bidir)") ;;
    ode|cd) args=(--ckpt="$(ckpt ar)") ;;
    dmd) args=(--ckpt="$(ckpt "$DISTILL")" --teacher="$(ckpt bidir)") ;;
  esac
  echo "== $stage: python train_$stage.py ${args[*]} $QUICK $AGAIN --out_dir=$OUT"
  python "train_$stage.py" "${args[@]}" $QUICK $AGAIN --out_dir="$OUT"
  if [ -n "$SHIP" ]; then python common.py ship "$OUT/$stage" "assets/$stage"; fi
done

echo "== infer"
python infer.py --ckpt="$(ckpt dmd)" --cameras=assets/orbit.json --out="$OUT/infer_orbit.mp4" \
  $([ -n "$QUICK" ] && echo "--height=16 --width=16")
python metric.py table "$OUT" | tee "$OUT/results.md"
echo "first-chunk latency: $(python -c "import json; print(round(1000 * json.load(open('$OUT/infer_orbit.json'))['first_chunk_latency_s']), 'ms')")" | tee -a "$OUT/results.md"
