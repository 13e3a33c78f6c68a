# Builder of one node of the Debian set: unpacks the data of its .deb files
# ($debs) into $out. Maintainer scripts do not run; the alternatives their
# postinst would install are written to $out/nix-support/alternatives (see
# alternatives.awk) for the environments to make, and the nodes it depends
# on ($depends) to $out/nix-support/depends, so that Nix records them as
# references. Uses the host's dpkg-deb, tar, awk and coreutils.
set -euo pipefail
mkdir -p "$out/nix-support"
: > "$out/nix-support/alternatives"
for deb in $debs; do
  # Plain permissions: Nix's builders may not set setuid or setgid bits.
  dpkg-deb --fsys-tarfile "$deb" | tar -C "$out" --extract --no-same-owner --no-same-permissions
  if dpkg-deb --info "$deb" postinst > "$TMPDIR/postinst" 2> /dev/null; then
    awk -f "$alternativesAwk" "$TMPDIR/postinst" >> "$out/nix-support/alternatives"
  fi
done
chmod -R u+w "$out"
printf '%s\n' $depends > "$out/nix-support/depends"
