# Builder of an attribute of the Debian set: a tree that merges the files of
# every node of its closure ($closure, in order; the first to provide a path
# keeps it), as dpkg would have installed them at /. Directories are real,
# files are links into the nodes, and the nodes' own symlinks are copied as
# they are, so that relative ones resolve as they do on Debian. Then what
# maintainer scripts would have made: the alternatives links (the highest
# priority of each name), and when ca-certificates is in the closure the CA
# bundle update-ca-certificates writes, with $extraCertificates added.
set -euo pipefail
export LC_ALL=C
mkdir -p "$out"
for node in $closure; do
  cd "$node"
  find . -mindepth 1 -path ./nix-support -prune -o -type d -printf '%P\0' | (cd "$out" && xargs -0 -r mkdir -p)
  find . -mindepth 1 -path ./nix-support -prune -o -type l -printf '%P\0' > "$TMPDIR/links"
  tar --null --no-recursion --files-from "$TMPDIR/links" -cf - | tar -C "$out" --skip-old-files -xf -
  find . -mindepth 1 -path ./nix-support -prune -o -type f -printf '%P\0' |
    NODE=$node xargs -0 -r sh -c 'for f; do [ -e "$out/$f" ] || [ -L "$out/$f" ] || ln -s "$NODE/$f" "$out/$f"; done' -
done

for node in $closure; do cat "$node/nix-support/alternatives"; done | sort -k1,1 -k2,2nr -k4,4 | awk '!seen[$1]++' |
  while read -r name priority link path slaves; do
    set -- "$link" "$path" $slaves
    while [ $# -ge 2 ]; do
      if { [ -e "$out$2" ] || [ -L "$out$2" ]; } && ! { [ -e "$out$1" ] || [ -L "$out$1" ]; }; then
        mkdir -p "$out$(dirname "$1")"
        ln -s "$2" "$out$1"
      fi
      shift 2
    done
  done

if [ -d "$out/usr/share/ca-certificates" ]; then
  mkdir -p "$out/etc/ssl/certs"
  bundle=$out/etc/ssl/certs/ca-certificates.crt
  rm -f "$bundle"
  find "$out/usr/share/ca-certificates" -name '*.crt' | sort | while read -r cert; do cat "$cert"; echo; done > "$TMPDIR/bundle"
  for cert in $extraCertificates; do cat "$cert"; echo; done >> "$TMPDIR/bundle"
  cp "$TMPDIR/bundle" "$bundle"
  [ -e "$out/etc/ssl/certs/ca-bundle.crt" ] || ln -s ca-certificates.crt "$out/etc/ssl/certs/ca-bundle.crt"
fi
