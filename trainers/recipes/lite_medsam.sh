#!/usr/bin/env bash
# The recipe of the shipped LiteMedSAM adapters (README, "The shipped adapters"): run from the repository
# root with the data in ../shared/data (or DATA=...). Stage "2d" trains from the backbone; "2d-brain"
# continues a 2d file with the whole brain drawn more often; "targets" gives the 2d file (step 500 of it)
# target prompts, a token per structure name, trained alone on 2d-brain's samples, everything else kept
# (that is lib/msa/weights/lite_medsam_adapters.pt); "3d" starts from that file and trains the depth
# branch alone (slabs of 8 cached slices; every other tensor kept), for lite_medsam_3d_adapters.pt.
#
#   trainers/recipes/lite_medsam.sh 2d 2d.pt [extra msa train options]
#   trainers/recipes/lite_medsam.sh 2d-brain OUT.pt --adapters 2d.pt [extra msa train options]
#   trainers/recipes/lite_medsam.sh targets OUT.pt --adapters 2d.pt [extra msa train options]
#   trainers/recipes/lite_medsam.sh 3d OUT.pt --adapters lib/msa/weights/lite_medsam_adapters.pt [options]
#
# Encoder features go to $MSA_CACHE_DIR (default ~/.cache/msa/features): a rerun encodes nothing.
set -euo pipefail
stage=$1 out=$2
shift 2
D=${DATA:-../shared/data}
MSA=${MSA:-.venv/bin/msa}
BRAIN="$D/brain_t1/brain_t1.nii.gz:$D/brain_t1/brain_t1_aseg.nii.gz::names=freesurfer-aseg::stride=2"
ASEG=Left-Cerebral-White-Matter,Right-Cerebral-White-Matter,Left-Cerebral-Cortex,Right-Cerebral-Cortex
ASEG=$ASEG,Left-Lateral-Ventricle,Right-Lateral-Ventricle,Left-Thalamus,Right-Thalamus,Left-Caudate,Right-Caudate
ASEG=$ASEG,Left-Putamen,Right-Putamen,Left-Pallidum,Right-Pallidum,Left-Hippocampus,Right-Hippocampus
ASEG=$ASEG,Left-Amygdala,Right-Amygdala,Left-Cerebellum-White-Matter,Right-Cerebellum-White-Matter
ASEG=$ASEG,Left-Cerebellum-Cortex,Right-Cerebellum-Cortex,Brain-Stem,Left-VentralDC,Right-VentralDC
ASEG=$ASEG,3rd-Ventricle,4th-Ventricle
VAL_ASEG=Left-Cerebral-White-Matter,Left-Cerebral-Cortex,Left-Lateral-Ventricle,Left-Thalamus,Left-Hippocampus
VAL_ASEG=$VAL_ASEG,Left-Putamen,Left-Cerebellum-Cortex,Brain-Stem
# Train: BTCV 00-17 and CHAOS 01-22 (the datalists' training lists), the brain's coronal (k) and axial (j)
# slices. Validate and select: BTCV 18-23, CHAOS 31-39, the brain's sagittal (i) slices, never trained on.
sources=(
  "$D/btcv/datalist.json::weight=2"
  "$D/chaos_mr/datalist.json"
  "$BRAIN::name=brain_whole::labels=none::whole=brain::axes=k,j::weight=${WHOLE_BRAIN_WEIGHT:-0.5}"
  "$BRAIN::name=brain::labels=$ASEG::axes=k,j::weight=${ASEG_WEIGHT:-0.5}"
  --val "$D/btcv/datalist.json" --val "$D/chaos_mr/datalist.json"
  --val "$BRAIN::name=brain::labels=$VAL_ASEG::whole=brain::axes=i"
  --val-per-structure 8 --encoder-blocks 2 --no-box-teacher --seed 0
  --cache-dir "${MSA_CACHE_DIR:-$HOME/.cache/msa/features}" --out "$out"
)
case $stage in
  2d-brain) WHOLE_BRAIN_WEIGHT=1 ASEG_WEIGHT=0.25 exec "$0" 2d "$out" --steps 300 --lr 2e-4 "$@" ;;
  targets) exec "$0" 2d-brain "$out" --target-probability 1 --targets-only --encoder-blocks 0 --lr 3e-4 "$@" ;;
  2d) exec "$MSA" train "${sources[@]}" --steps 600 --batch-size 8 --lr 3e-4 --eval-every 100 "$@" ;;
  3d) exec "$MSA" train "${sources[@]}" --three-d --depth-only --steps 200 --batch-size 16 --lr 1e-3 \
        --eval-every 50 "$@" ;;
  *) echo "usage: $0 2d|2d-brain|targets|3d OUT.pt [msa train options]" >&2; exit 2 ;;
esac
