#!/usr/bin/env bash
# Layer reuse with real clients (README "Benchmarks"): replays a request
# sequence (default ../shared/data/debian-bookworm/sequence-public.txt, or
# $NIXERY_BENCH_SEQUENCE) against a registry serving pkgs-debian, once per
# layering strategy (stable, nixery, size-cohort; or $NIXERY_BENCH_STRATEGIES),
# each a fresh registry with its own storage (the Nix store is shared, so only
# the first strategy's builds run Nix). Two clients pull every request in order:
#   skopeo  into one persistent OCI layout, which keeps every blob it has seen
#   docker  a private dockerd (classic overlay2 image store, on a private
#           containerd), whose reuse stops at the first layer whose chain it lacks
# The bytes each client really fetched are the deltas of the registry's
# nixery_bytes_served_total{kind="blob"} around its replay (per request, too).
# Next to each, ../shared/tools/layering_eval.py simulates the same sequence
# on the images as this registry built them: for every image, the store paths
# of each layer (listed from the layer blobs the OCI layout holds, checked
# against the registry's plan records) with narSize fields scaled so that a
# layer's sizes sum to its compressed blob size, fed back through its cli:
# strategy in manifest order. The root filesystem layer (the last one, per
# image) is modelled as one more store path of its own, at the top; the image
# config blob, which the evaluator does not model, is added on both sides by
# each client's rule (skopeo fetches it on every request, docker once per new
# image), and the per-request deltas check that rule.
# Ratios are against the bytes of pulling every request with no cache, and
# against stable, both measured in the same run. Goals: real and simulated
# bytes within 3 % for every client and strategy; stable fetches the fewest
# bytes for both clients. Last line: `reuse: key=value ...`.
#
#   scripts/bench-reuse.sh          about 15 minutes on 2 cores (more when
#                                   Nix has not built the images yet)
# NIXERY_BENCH_KEEP=1 keeps the work folder (logs, layouts, per-request bytes).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
sequence=${NIXERY_BENCH_SEQUENCE:-$root/../shared/data/debian-bookworm/sequence-public.txt}
evaluator=$root/../shared/tools/layering_eval.py
read -r -a strategies <<< "${NIXERY_BENCH_STRATEGIES:-stable nixery size-cohort}"
[[ -f $sequence ]] || { echo "no sequence at $sequence" >&2; exit 1; }

scripts/setup.sh bench > /dev/null
cargo build --release --quiet
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nbuild-users-group ='

# Short: the daemons' sockets live here.
work=$(mktemp -d /tmp/nxr.XXXXXX)
pids=()
cleanup() {
  # SIGTERM first: dockerd unmounts its overlays before its folder goes.
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # NIXERY_BENCH_KEEP=1 keeps the work folder (logs, layouts, per-request bytes).
  if [[ ${NIXERY_BENCH_KEEP:-} == 1 ]]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

mapfile -t requests < <(sed 's/#.*//; s/[[:space:]]//g; /^$/d' "$sequence")
started=$(date +%s)

# --- the private containerd and dockerd (the flags of tests/common/engines.rs)
cat > "$work/containerd.toml" <<EOF
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
EOF
containerd --config "$work/containerd.toml" > "$work/containerd.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  [[ -S $work/containerd.sock ]] && ctr --address "$work/containerd.sock" version > /dev/null 2>&1 && break
  sleep 0.1
done
ctr --address "$work/containerd.sock" version > /dev/null

# start_dockerd NAME: a dockerd with a data root of its own (nothing of an
# earlier strategy's pulls), the classic image store; sets $docker_pid.
start_dockerd() {
  local d=$work/$1
  mkdir -p "$d"
  echo '{"features": {"containerd-snapshotter": false}}' > "$d/daemon.json"
  dockerd --config-file="$d/daemon.json" --host="unix://$d/docker.sock" --data-root="$d/root" \
    --exec-root="$d/exec" --pidfile="$d/docker.pid" --iptables=false --ip6tables=false --bridge=none \
    --storage-driver=overlay2 --containerd="$work/containerd.sock" > "$d/dockerd.log" 2>&1 &
  docker_pid=$!
  pids+=("$docker_pid")
  export DOCKER_HOST=unix://$d/docker.sock
  for _ in $(seq 300); do docker version > /dev/null 2>&1 && break; sleep 0.1; done
  docker version > /dev/null
  local driver
  driver=$(docker info -f '{{.Driver}}')
  [[ $driver == overlay2 ]] || { echo "dockerd uses $driver, not the classic overlay2 store" >&2; exit 1; }
}

stop_dockerd() {
  kill "$docker_pid"
  for _ in $(seq 100); do kill -0 "$docker_pid" 2>/dev/null || break; sleep 0.1; done
}

# blob_bytes: the registry's bytes of blobs served so far.
# (Not through awk: mawk's %d stops at 2^31 - 1, bash's arithmetic has 64 bits.)
blob_bytes() {
  local v
  v=$(curl -fs "http://$address/metrics" | sed -n 's/^nixery_bytes_served_total{kind="blob"} \([0-9]*\)$/\1/p')
  echo "${v:-0}"
}

# --- per strategy: a registry, its builds, the two replays
for s in "${strategies[@]}"; do
  d=$work/$s
  mkdir -p "$d"
  : > "$d/registry.log"
  # NIX_TIMEOUT: the first strategy's builds run Nix on a cold store.
  NIXERY_LAYERING=$s NIX_TIMEOUT=1800 PORT=0 NIXERY_LISTEN_ADDRESS=127.0.0.1 NIXERY_PKGS_PATH=$root/pkgs-debian \
    NIXERY_STORAGE_BACKEND=filesystem STORAGE_PATH=$d/storage NO_COLOR=1 \
    target/release/nixery serve > "$d/registry.log" 2>&1 &
  registry=$!
  pids+=("$registry")
  until address=$(sed -n 's|^nixery is serving on http://||p' "$d/registry.log") && [[ -n $address ]]; do
    kill -0 "$registry" || { cat "$d/registry.log"; exit 1; }
    sleep 0.05
  done

  # Builds first (a GET of each manifest), so that the replays time pulls only.
  t0=$(date +%s)
  for image in $(printf '%s\n' "${requests[@]}" | awk '!seen[$0]++'); do
    curl -fsS -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
      "http://$address/v2/$image/manifests/latest"
  done
  t1=$(date +%s)

  layout=$d/oci
  : > "$d/skopeo.tsv"
  before=$(blob_bytes)
  for i in "${!requests[@]}"; do
    image=${requests[$i]}
    b=$(blob_bytes)
    skopeo copy -q --src-tls-verify=false "docker://$address/$image:latest" "oci:$layout:${image//\//_}" > /dev/null
    printf '%s\t%s\t%s\n' "$i" "$image" $(($(blob_bytes) - b)) >> "$d/skopeo.tsv"
  done
  skopeo_real=$(($(blob_bytes) - before))
  t2=$(date +%s)

  start_dockerd "docker-$s"
  : > "$d/docker.tsv"
  before=$(blob_bytes)
  for i in "${!requests[@]}"; do
    image=${requests[$i]}
    b=$(blob_bytes)
    docker pull -q "$address/$image:latest" > /dev/null
    printf '%s\t%s\t%s\n' "$i" "$image" $(($(blob_bytes) - b)) >> "$d/docker.tsv"
    # The layers docker holds for the image, to check it got what skopeo got.
    printf '%s\t%s\n' "$image" "$(docker image inspect -f '{{json .RootFS.Layers}}' "$address/$image:latest")" >> "$d/docker-layers.tsv"
  done
  docker_real=$(($(blob_bytes) - before))
  stop_dockerd
  t3=$(date +%s)
  kill "$registry"
  printf '%s\tskopeo_real=%s docker_real=%s build_s=%s skopeo_s=%s docker_s=%s\n' \
    "$s" "$skopeo_real" "$docker_real" $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) >> "$work/real.txt"
  echo "# $s: built in $((t1 - t0)) s, skopeo replay $((t2 - t1)) s, docker replay $((t3 - t2)) s" >&2
done

# --- the model: the registry's layers as built, through the evaluator
cat > "$work/model.py" <<'EOF'
"""Turns one strategy's run into the evaluator's input, runs the evaluator,
and prints the simulated bytes and the client-rule checks as key=value."""
import gzip, hashlib, json, os, re, subprocess, sys, tarfile

d, sequence, evaluator, listings_file = sys.argv[1:5]
layout = os.path.join(d, "oci")
STORE = re.compile(r"^(?:\./)?/?nix/store/([^/]+)")
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"

def blob(digest):
    return os.path.join(layout, "blobs", *digest.split(":", 1))

requests = [l.split("#", 1)[0].strip() for l in open(sequence)]
requests = [r for r in requests if r]
distinct = list(dict.fromkeys(requests))
key = lambda image: image.replace("/", "+")

# Each image's manifest as skopeo stored it (by its tag in the layout).
index = json.load(open(os.path.join(layout, "index.json")))
by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
manifests = {i: json.load(open(blob(by_tag[i.replace("/", "_")]))) for i in distinct}

# The registry's plan records: each layer's contents (names without hashes).
plans = {}
plan_dir = os.path.join(d, "storage", "cache", "plans")
for f in os.listdir(plan_dir):
    for layer in json.load(open(os.path.join(plan_dir, f)))["layers"]:
        plans[layer["packed"]["digest"]] = sorted(layer["contents"])

# Store paths per layer blob, from the blobs themselves (kept across strategies).
listings = json.load(open(listings_file)) if os.path.exists(listings_file) else {}
for image in distinct:
    for layer in manifests[image]["layers"][:-1]:
        dg = layer["digest"]
        if dg not in listings:
            with tarfile.open(blob(dg), "r:gz") as t:
                names = {m.group(1) for m in map(STORE.match, t.getnames()) if m}
            listings[dg] = sorted("/nix/store/" + n for n in names)
json.dump(listings, open(listings_file, "w"))

mismatch = 0
for image in distinct:
    for layer in manifests[image]["layers"][:-1]:
        names = sorted(re.sub(r"^[a-z0-9]{32}-", "", os.path.basename(p)) for p in listings[layer["digest"]])
        if layer["digest"] in plans and plans[layer["digest"]] != names:
            mismatch += 1
    root = manifests[image]["layers"][-1]["digest"]
    if root in plans and any(c.startswith("/nix/store") or STORE.match(c) for c in plans[root]):
        sys.exit(f"{image}: its last layer is not the root filesystem layer")

paths = sorted({p for ps in listings.values() for p in ps})
info = json.loads(subprocess.run(["nix", "path-info", "--json", *paths], check=True,
                                 capture_output=True, text=True).stdout)
if isinstance(info, dict):
    info = [dict(v, path=k) for k, v in info.items()]
nar = {e["path"]: e["narSize"] for e in info}
refs = {e["path"]: e.get("references", []) for e in info}

graphs, layers_dir = os.path.join(d, "graphs"), os.path.join(d, "layers")
os.makedirs(graphs, exist_ok=True)
os.makedirs(layers_dir, exist_ok=True)
for image in distinct:
    entries, out = [], []
    members = set()
    for layer in manifests[image]["layers"]:
        ps = listings.get(layer["digest"])
        if ps is None:  # the root filesystem layer: one store path of its own
            h = hashlib.sha256(("rootfs:" + image).encode()).digest()
            ps = ["/nix/store/" + "".join(NIX32[b % 32] for b in h[:32]) + "-rootfs-" + key(image)]
            nar[ps[0]], refs[ps[0]] = 0, []
        # narSize scaled: the layer's members sum to its compressed size.
        total = sum(nar[p] for p in ps)
        sizes = {p: (layer["size"] * nar[p] // total if total else layer["size"] // len(ps)) for p in ps}
        sizes[max(ps, key=lambda p: (nar[p], p))] += layer["size"] - sum(sizes.values())
        members.update(ps)
        for p in ps:
            entries.append({"path": p, "narSize": sizes[p], "references": refs[p]})
        out.append({"paths": ps})
    for e in entries:
        e["references"] = [r for r in e["references"] if r in members]
    json.dump({"graph": entries}, open(os.path.join(graphs, key(image) + ".json"), "w"))
    json.dump({"layers": out}, open(os.path.join(layers_dir, key(image) + ".json"), "w"))

report = os.path.join(d, "eval.json")
cli = f"cat {layers_dir}/{{image}}.json"
ev = subprocess.run([sys.executable, evaluator, "--graphs", graphs, "--order", sequence,
                     "--updates-per-image", "0", "--check-determinism", "-s", "cli:" + cli,
                     "--json", report], capture_output=True, text=True)
if ev.returncode != 0:
    sys.exit("evaluator failed: " + ev.stderr)
r = json.load(open(report))["strategies"]["cli:" + cli]

config = {i: manifests[i]["config"]["size"] for i in distinct}
size = {i: config[i] + sum(l["size"] for l in manifests[i]["layers"]) for i in distinct}
skopeo_sim = r["pull_bytes"] + sum(config[i] for i in requests)
docker_sim = r["chain_pull_bytes"] + sum(config[i] for i in distinct)

# The client rules for repeated requests: skopeo fetches the config again and
# nothing else; docker fetches nothing.
def repeats(client, want):
    seen, ok, n = set(), 0, 0
    for line in open(os.path.join(d, client + ".tsv")):
        _, image, got = line.rstrip("\n").split("\t")
        if image in seen:
            n += 1
            ok += int(got) == want(image)
        seen.add(image)
    return ok, n

# Did docker get the images skopeo got (the config's diff_ids)?
diff_ids = {i: json.load(open(blob(manifests[i]["config"]["digest"])))["rootfs"]["diff_ids"] for i in distinct}
same = {}
for line in open(os.path.join(d, "docker-layers.tsv")):
    image, got = line.rstrip("\n").split("\t")
    same[image] = json.loads(got) == diff_ids[image]
# Per request, the chain rule on the manifests, against what docker fetched.
chains, diverge = set(), []
seen_cfg = set()
for line in open(os.path.join(d, "docker.tsv")):
    n, image, got = line.rstrip("\n").split("\t")
    want, chain, missing = 0, (), False
    for layer in manifests[image]["layers"]:
        chain += (layer["digest"],)
        if missing or chain not in chains:
            missing = True
            chains.add(chain)
            want += layer["size"]
    if manifests[image]["config"]["digest"] not in seen_cfg:
        want += config[image]
        seen_cfg.add(manifests[image]["config"]["digest"])
    if int(got) != want:
        diverge.append(f"{n}:{image}:{got}/{want}")
if diverge:
    print("docker requests that differ from the chain rule (fetched/modelled): " + " ".join(diverge[:12]), file=sys.stderr)
sk_ok, sk_n = repeats("skopeo", lambda i: config[i])
dk_ok, dk_n = repeats("docker", lambda i: 0)
print(f"skopeo_sim={skopeo_sim} docker_sim={docker_sim} nocache={sum(size[i] for i in requests)} "
      f"layers={r['distinct_layers']} mean_layers={r['mean_layers']:.1f} plan_mismatch={mismatch} "
      f"skopeo_repeats_ok={sk_ok}/{sk_n} docker_repeats_ok={dk_ok}/{dk_n} "
      f"docker_same_images={sum(same.values())}/{len(distinct)} docker_chain_rule_ok={len(requests) - len(diverge)}/{len(requests)}")
EOF

for s in "${strategies[@]}"; do
  printf '%s\t%s\n' "$s" "$(python3 "$work/model.py" "$work/$s" "$sequence" "$evaluator" "$work/listings.json")" >> "$work/sim.txt"
done

# --- the report
python3 - "$work/real.txt" "$work/sim.txt" "${#requests[@]}" $(($(date +%s) - started)) <<'EOF'
import sys
def kv(path):
    out = {}
    for line in open(path):
        s, rest = line.rstrip("\n").split("\t")
        out[s] = dict(x.split("=", 1) for x in rest.split())
    return out
real, sim = kv(sys.argv[1]), kv(sys.argv[2])
strategies = list(real)
ref = "stable" if "stable" in real else strategies[0]
mib = lambda b: f"{b / 2**20:,.1f}"
print(f"Layer reuse, {sys.argv[3]} requests, real clients against the evaluator's simulation")
print()
print("| strategy | client | real MiB | simulated MiB | real / sim | real / no cache | real / stable | within 3 % |")
print("|---|---|---:|---:|---:|---:|---:|---|")
agree, summary = True, []
for s in strategies:
    for c in ("skopeo", "docker"):
        r, m = int(real[s][c + "_real"]), int(sim[s][c + "_sim"])
        ok = abs(r - m) <= 0.03 * m
        agree &= ok
        print(f"| {s} | {c} | {mib(r)} | {mib(m)} | {r / m:.4f} | {r / int(sim[s]['nocache']):.4f} | "
              f"{r / int(real[ref][c + '_real']):.4f} | {'PASS' if ok else 'FAIL'} |")
        k = s.replace("-", "_")
        summary += [f"{k}_{c}={r}", f"{k}_{c}_sim={m}"]
print()
print("| strategy | distinct layers | mean layers per image | no cache MiB | plan mismatches | skopeo repeats = config only | docker repeats = nothing | docker got skopeo's images | docker requests = chain rule | build s | skopeo s | docker s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in strategies:
    x, y = sim[s], real[s]
    print(f"| {s} | {x['layers']} | {x['mean_layers']} | {mib(int(x['nocache']))} | {x['plan_mismatch']} | "
          f"{x['skopeo_repeats_ok']} | {x['docker_repeats_ok']} | {x['docker_same_images']} | {x['docker_chain_rule_ok']} | {y['build_s']} | {y['skopeo_s']} | {y['docker_s']} |")
print()
fewest = {c: all(int(real[ref][c + "_real"]) <= int(real[s][c + "_real"]) for s in strategies) for c in ("skopeo", "docker")}
for c in ("skopeo", "docker"):
    print(f"{'PASS' if fewest[c] else 'FAIL'}: {ref} fetches the fewest bytes with {c}")
print(f"{'PASS' if agree else 'FAIL'}: real and simulated bytes agree within 3 % for every client and strategy")
print(f"took {sys.argv[4]} s")
yes = lambda b: "yes" if b else "no"
print("reuse: " + " ".join(summary) + f" stable_fewest={yes(all(fewest.values()))} agree_3pct={yes(agree)}")
EOF
