#!/bin/bash
# The capped Colab-shaped notebook runs of issue 30 inside one device lease, detached so that the calls that
# poll them keep the machine (it goes back 30 s after a call returns). Run from the repository root there,
# transformers >= 5.24 on PYTHONPATH (gpu_notes.md: carried as a wheel).
#   bash benchmarks/colab_gpu_lease.sh start quick full  # build the checkpoint, then each profile's run in turn
#   bash benchmarks/colab_gpu_lease.sh start estimate    # build the checkpoint, the full profile's estimate only
#   bash benchmarks/colab_gpu_lease.sh start full-rest   # the full profile with one design configuration: its
#                                                        # work after the sweep, where a lease cannot hold both
#   bash benchmarks/colab_gpu_lease.sh poll SECONDS      # wait until done or SECONDS passed; logs, outputs to $OUT
# Each run compiles with empty inductor and Triton caches of its own, as a fresh Colab runtime does.
R=/tmp/run
case "$1" in
start)
  shift
  mkdir -p $R && export PYTHONUNBUFFERED=1
  runs=""
  for name in "$@"; do
    extra=""
    case "$name" in
      quick|full) mode=notebook profile=$name ;;
      estimate) mode=estimate profile=full ;;
      full-rest) mode=notebook profile=full extra="'config_names=[\"topk_8_baseline\"]'" ;;
      *) echo "start takes quick, full, full-rest or estimate, got '$name'" >&2; exit 2 ;;
    esac
    runs="$runs TORCHINDUCTOR_CACHE_DIR=/tmp/cache_$name/inductor TRITON_CACHE_DIR=/tmp/cache_$name/triton \
      python3 benchmarks/colab_gpu_run.py $mode /tmp/ckpt $R/$name --cap-gib 15 'profile=\"$profile\"' \
      'dtype=\"float16\"' 'reuse_results=null' $extra > $R/$name.log 2>&1;"
  done
  setsid nohup bash -c "
    date -u +%FT%TZ > $R/started
    [ -f /tmp/ckpt/config.json ] || python3 benchmarks/colab_gpu_run.py build /tmp/ckpt > $R/build.log 2>&1
    $runs
    date -u +%FT%TZ > $R/DONE" > /dev/null 2>&1 < /dev/null &
  ;;
poll)
  for _ in $(seq 1 $(( $2 / 10 ))); do [ -f $R/DONE ] && break; sleep 10; done
  cat $R/started $R/DONE 2>/dev/null
  for f in $R/*.log; do echo "== $f"; grep -v "Loading weights\|it/s\]\|^--- cell" "$f" | tail -n 12; done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  tar czf $OUT/outputs.tgz -C $R --exclude=configs --exclude='quality*' --exclude=allocations --exclude='*.pt' \
    --exclude=visualizations .
  ;;
*) echo "usage: $0 start quick|full|estimate ... | poll SECONDS" >&2; exit 2 ;;
esac
