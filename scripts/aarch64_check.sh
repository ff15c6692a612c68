#!/usr/bin/env bash
# Run the edgekv device runtime on aarch64 under emulation (qemu-user + an arm64 Debian root).
#
#   make check-arm            (or: bash scripts/aarch64_check.sh)
#
# Steps, each cached under .cache/ (gitignored) so a second run only repeats the last two:
#   1. root    an arm64 Debian bookworm root (debootstrap --foreign + second stage under
#              qemu-aarch64 via binfmt_misc): python3, venv, g++ (hnswlib builds from source)
#   2. deps    a venv in the root with the device dependencies only: numpy, onnxruntime
#              (its aarch64 wheel), tokenizers, jinja2, typer, tqdm, pillow, and hnswlib
#              built with HNSWLIB_NO_NATIVE=1 (no -march=native: portable to any ARMv8 CPU)
#   3. repo    this working tree copied in and installed with `pip install --no-deps`
#   4. export  on the host (x86-64, torch): the tiny random Llama test model exported with
#              a 5-entry memory and its HNSW index, plus reference logits and greedy tokens
#   5. run     under emulation: `edgekv run --json` (automatic = exact search, and forced
#              HNSW), and a check that the aarch64 logits, retrieved slots and greedy tokens
#              equal the host's
#
# The emulated CPU is a Cortex-A72 (Raspberry Pi 4: ARMv8.0, no dot-product, no LSE atomics)
# unless ARM_CPU says otherwise (cortex-a76 = Pi 5, max = everything qemu has), so code
# built for a newer CPU dies here with SIGILL as it would on the board. qemu-user passes
# the host's x86 /proc/cpuinfo through, and onnxruntime's CPU detection segfaults parsing
# it (at `import onnxruntime`); the root gets an aarch64 /proc/cpuinfo for ARM_CPU instead.
#
# Needs root (debootstrap, chroot, mounts), network access to the Debian and PyPI mirrors
# and the host venv (.venv, `make setup`). Environment knobs: ARM_ROOT, ARM_MIRROR,
# ARM_SUITE, ARM_CPU, HOST_PY (host python), KEEP_MOUNTS=1 (leave /proc etc. mounted for debugging).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARM_ROOT="${ARM_ROOT:-$REPO/.cache/arm64-root}"
ARM_MIRROR="${ARM_MIRROR:-http://deb.debian.org/debian}"
ARM_SUITE="${ARM_SUITE:-bookworm}"
ARM_CPU="${ARM_CPU:-cortex-a72}"
HOST_PY="${HOST_PY:-$REPO/.venv/bin/python}"
WORK="$REPO/.cache/arm-check"
VENV=/opt/edgekv-venv                       # inside the root
DEPS="numpy==2.4.6 onnxruntime==1.32.0 tokenizers==0.22.2 Jinja2==3.1.6 typer==0.29.2 tqdm==4.70.1 pillow==13.0.0"
HNSWLIB="hnswlib==0.8.0"
PACKAGES="python3,python3-venv,python3-dev,g++,ca-certificates"

log() { printf '[check-arm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'check-arm: error: %s\n' "$*" >&2; exit 1; }
in_root() { chroot "$ARM_ROOT" /usr/bin/env -i HOME=/root PATH=$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin \
              LANG=C.UTF-8 QEMU_CPU="$ARM_CPU" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
              PIP_CERT=/etc/edgekv-host-ca.crt SSL_CERT_FILE=/etc/edgekv-host-ca.crt "$@"; }

preflight() {
  [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mounts); run it as root or in a container"
  [ -x "$HOST_PY" ] || die "no host python at $HOST_PY; run 'make setup' first"
  if ! command -v debootstrap >/dev/null || ! [ -x /usr/bin/qemu-aarch64-static ]; then
    log "installing qemu-user-static, binfmt-support and debootstrap (apt)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static binfmt-support debootstrap >/dev/null
  fi
  if ! [ -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
      || die "binfmt_misc is not mounted and cannot be (a container without privileges?); qemu-user needs it"
  fi
  if ! [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || update-binfmts --import qemu-aarch64 \
      || die "cannot register qemu-aarch64 with binfmt_misc"
  fi
  grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt qemu-aarch64 is registered but disabled"
}

# An aarch64 /proc/cpuinfo for ARM_CPU, one entry per host CPU (sysfs shows the host's).
fake_cpuinfo() {
  local part=0xd08 features="fp asimd evtstrm crc32 cpuid" i
  if [ "$ARM_CPU" != cortex-a72 ]; then
    part=0xd0b features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
  fi
  for i in $(seq 0 $(($(nproc) - 1))); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
    printf 'CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: 3\n\n' "$part"
  done
}

mount_root() {
  for d in proc sys dev; do mountpoint -q "$ARM_ROOT/$d" && continue; mkdir -p "$ARM_ROOT/$d"; done
  mountpoint -q "$ARM_ROOT/proc" || mount -t proc proc "$ARM_ROOT/proc"
  mountpoint -q "$ARM_ROOT/sys" || mount --rbind /sys "$ARM_ROOT/sys"
  mountpoint -q "$ARM_ROOT/dev" || mount --rbind /dev "$ARM_ROOT/dev"
  fake_cpuinfo >"$WORK/cpuinfo"
  mount --bind "$WORK/cpuinfo" "$ARM_ROOT/proc/cpuinfo"
  cp -L /etc/resolv.conf "$ARM_ROOT/etc/resolv.conf" 2>/dev/null || true
  # The host's CA bundle (it may trust a proxy's certificate that the root's bundle lacks).
  cp -L "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ARM_ROOT/etc/edgekv-host-ca.crt"
}

umount_root() {
  [ "${KEEP_MOUNTS:-0}" = 1 ] && return 0
  for d in dev sys proc mnt/edgekv; do
    mountpoint -q "$ARM_ROOT/$d" 2>/dev/null && umount -R -l "$ARM_ROOT/$d" || true
  done
}

step_root() {
  [ -f "$ARM_ROOT/.edgekv-root-ok" ] && { log "root: cached ($ARM_ROOT)"; return; }
  log "root: debootstrap $ARM_SUITE arm64 into $ARM_ROOT (first stage)"
  rm -rf "$ARM_ROOT"; mkdir -p "$ARM_ROOT"
  debootstrap --foreign --arch=arm64 --variant=minbase --include="$PACKAGES" \
    "$ARM_SUITE" "$ARM_ROOT" "$ARM_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || die "debootstrap (first stage) failed; see $WORK/debootstrap.log"
  cp /usr/bin/qemu-aarch64-static "$ARM_ROOT/usr/bin/"   # for a binfmt entry without the F flag
  log "root: second stage under emulation (several minutes)"
  chroot "$ARM_ROOT" /debootstrap/debootstrap --second-stage >>"$WORK/debootstrap.log" 2>&1 \
    || die "debootstrap (second stage) failed; see $WORK/debootstrap.log"
  touch "$ARM_ROOT/.edgekv-root-ok"
}

step_deps() {
  local want="$DEPS $HNSWLIB"
  [ "$(cat "$ARM_ROOT/.edgekv-deps-ok" 2>/dev/null)" = "$want" ] && { log "deps: cached"; return; }
  log "deps: venv + wheels (aarch64) in the root"
  in_root python3 -m venv "$VENV"
  in_root pip install -q --upgrade pip setuptools wheel
  in_root pip install -q --only-binary=:all: $DEPS
  log "deps: building $HNSWLIB from source with HNSWLIB_NO_NATIVE=1 (slow under emulation)"
  in_root pip install -q pybind11
  in_root env HNSWLIB_NO_NATIVE=1 pip install -q --no-build-isolation --no-binary=hnswlib "$HNSWLIB"
  echo "$want" >"$ARM_ROOT/.edgekv-deps-ok"
}

step_repo() {
  log "repo: copying the working tree and 'pip install --no-deps'"
  rm -rf "$ARM_ROOT/opt/edgekv-src"; mkdir -p "$ARM_ROOT/opt/edgekv-src"
  (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) \
    | tar -C "$ARM_ROOT/opt/edgekv-src" -xf -
  in_root pip install -q --no-deps --no-build-isolation /opt/edgekv-src >"$WORK/pip-repo.log" 2>&1 \
    || { tail -20 "$WORK/pip-repo.log" >&2; die "installing edgekv in the root failed; see $WORK/pip-repo.log"; }
}

step_export() {
  log "export: tiny Llama + memory on the host (x86-64)"
  rm -rf "$WORK/tiny"; mkdir -p "$WORK/tiny"
  (cd "$REPO" && "$HOST_PY" - "$WORK/tiny" <<'EOF'
import json, os, sys
sys.path.insert(0, "tests")
import numpy as np
from tiny_models import make_tiny_model
from test_runtime import build_memory
from edgekv.host.models import load_backbone
from edgekv.export.pipeline import export_model
from edgekv.runtime import Runtime

out = sys.argv[1]
src = make_tiny_model("llama", os.path.join(out, "hf"))
bb = load_backbone(src)
mem = os.path.join(out, "memory.ekv")
build_memory(mem, bb)
art = os.path.join(out, "artifacts")
export_model(src, art, progress=False, memory=mem)  # with the memory: its HNSW index too
prompt = "code for river?"
with Runtime.load(art, memory=mem, k=2) as rt:
    ret = rt.retrieve(prompt)
    logits = rt.logits(rt.prompt_ids(prompt), *rt.memory_kv(ret))
    res = rt.generate(prompt, max_new_tokens=8)
np.save(os.path.join(out, "host_logits.npy"), logits)
with open(os.path.join(out, "host.json"), "w") as f:
    json.dump({"prompt": prompt, "token_ids": res.token_ids, "slots": [r.slot for r in ret]}, f)
print(json.dumps({"host_token_ids": res.token_ids, "host_slots": [r.slot for r in ret]}))
EOF
  ) >"$WORK/export.log" 2>&1 || { tail -20 "$WORK/export.log" >&2; die "host export failed; see $WORK/export.log"; }
  tail -1 "$WORK/export.log"
}

step_run() {
  mkdir -p "$ARM_ROOT/mnt/edgekv"
  mountpoint -q "$ARM_ROOT/mnt/edgekv" || mount --bind "$WORK/tiny" "$ARM_ROOT/mnt/edgekv"
  local t0=$SECONDS rc=0
  log "run: edgekv run --json under qemu-aarch64 -cpu $ARM_CPU (automatic retrieval: exact for 5 entries)"
  in_root edgekv run /mnt/edgekv/artifacts --memory /mnt/edgekv/memory.ekv -k 2 \
    --prompt "code for river?" -n 8 --json || rc=$?
  log "run: exit $rc, $((SECONDS - t0)) s (process start, imports, hash check, load, generate; emulated)"
  [ $rc = 0 ] || return $rc
  t0=$SECONDS
  log "run: aarch64 against the host: logits, slots and greedy tokens; exact and HNSW search"
  in_root python3 - <<'EOF' || rc=$?
import json, platform, sys, time
t = time.perf_counter()
import numpy as np, onnxruntime
from edgekv.index import hnswlib_status
from edgekv.runtime import Runtime
host = json.load(open("/mnt/edgekv/host.json"))
want = np.load("/mnt/edgekv/host_logits.npy")
out = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
       "onnxruntime": onnxruntime.__version__, "hnswlib": list(hnswlib_status())}
for force in (None, "hnsw"):
    with Runtime.load("/mnt/edgekv/artifacts", memory="/mnt/edgekv/memory.ekv", k=2, retrieval=force) as rt:
        ret = rt.retrieve(host["prompt"])
        got = rt.logits(rt.prompt_ids(host["prompt"]), *rt.memory_kv(ret))
        res = rt.generate(host["prompt"], max_new_tokens=8)
        out[force or "auto"] = {"mode": rt.retriever.mode, "reason": rt.retriever.reason,
                                "slots": [r.slot for r in ret], "token_ids": res.token_ids, "text": res.text,
                                "max_abs_logit_diff": float(np.abs(got - want).max()),
                                "ttft_ms": round(res.ttft_ms, 1), "tokens_per_s": round(res.tokens_per_s, 1)}
out["host"] = {"slots": host["slots"], "token_ids": host["token_ids"]}
out["seconds"] = round(time.perf_counter() - t, 1)
for key, value in out.items():
    print(f"{key}: {json.dumps(value)}")
tol = 1e-3 * max(1.0, float(np.abs(want).max()))
ok = out["machine"] == "aarch64" and out["auto"]["mode"] == "exact" and out["hnsw"]["mode"] == "hnsw"
for key in ("auto", "hnsw"):
    r = out[key]
    ok = ok and r["max_abs_logit_diff"] <= tol and r["slots"] == host["slots"] and r["token_ids"] == host["token_ids"]
sys.exit(0 if ok else 1)
EOF
  log "run: exit $rc, $((SECONDS - t0)) s"
  return $rc
}

main() {
  local t0=$SECONDS
  mkdir -p "$WORK"
  preflight
  trap umount_root EXIT
  step_root
  mount_root
  step_deps
  step_repo
  step_export
  step_run || die "aarch64 results differ from the host's (see above)"
  log "OK: the device runtime ran on aarch64 under emulation and matched the host ($((SECONDS - t0)) s in all)"
}

main "$@"
