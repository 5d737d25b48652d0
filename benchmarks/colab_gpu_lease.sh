#!/bin/bash
# The capped Colab-shaped notebook runs of issue 30 inside one device lease, detached so that the calls that
# poll them keep the machine (it goes back 30 s after a call returns). Run from the repository root there,
# transformers >= 5.24 on PYTHONPATH (gpu_notes.md: carried as a wheel).
#   bash benchmarks/colab_gpu_lease.sh start        # build the checkpoint, the quick run, the full profile's estimate
#   bash benchmarks/colab_gpu_lease.sh start full   # build the checkpoint, the full profile's run
#   bash benchmarks/colab_gpu_lease.sh poll SECONDS # wait until done or SECONDS passed; logs and outputs to $OUT
R=/tmp/run
case "$1" in
start)
  mkdir -p $R && export PYTHONUNBUFFERED=1
  setsid nohup bash -c "
    date -u +%FT%TZ > $R/started
    [ -f /tmp/ckpt/config.json ] || python3 benchmarks/colab_gpu_run.py build /tmp/ckpt > $R/build.log 2>&1
    if [ '$2' = full ]; then
      python3 benchmarks/colab_gpu_run.py notebook /tmp/ckpt $R/full --cap-gib 15 'profile=\"full\"' \
        'dtype=\"float16\"' 'reuse_results=null' > $R/full.log 2>&1
    else
      python3 benchmarks/colab_gpu_run.py notebook /tmp/ckpt $R/quick --cap-gib 15 'profile=\"quick\"' \
        'dtype=\"float16\"' 'reuse_results=null' > $R/quick.log 2>&1
      python3 benchmarks/colab_gpu_run.py estimate /tmp/ckpt $R/full --cap-gib 15 'profile=\"full\"' \
        'dtype=\"float16\"' 'reuse_results=null' > $R/full_estimate.log 2>&1
    fi
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
*) echo "usage: $0 start | poll SECONDS" >&2; exit 2 ;;
esac
