# Looks up the requested packages in a package set, the way the original
# Nixery's prepare-image.nix does: the exact attribute path first, then the
# same path with every component that matches a top-level attribute name
# case-insensitively replaced by that name's real spelling. Evaluated with
# `nix-instantiate --read-write-mode --eval --strict --json`, so the
# derivations it names are written to the store, ready to realise.
#
# Returns one record per package: { name, status = "ok" | "missing" |
# "notPackage", drv, out, output } (the last three when ok; not named
# drvPath/outPath, which would make toJSON print the record as a string).
{
  srcType,
  srcArgs,
  system,
  # JSON: [ { name = "python3packages.numpy"; path = [ "python3packages" "numpy" ]; } ]
  packages,
}:
let
  source =
    if srcType == "path" then
      srcArgs
    else if srcType == "nixpkgs" then
      builtins.fetchTarball "https://github.com/NixOS/nixpkgs/archive/${srcArgs}.tar.gz"
    else if srcType == "git" then
      builtins.fetchGit (builtins.fromJSON srcArgs)
    else
      throw "unknown package source type ${srcType}";

  pkgs = import source { inherit system; };

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # lower-case spelling → real spelling, for top-level names with upper case.
  spellings = builtins.listToAttrs (
    map (name: {
      name = toLower name;
      value = name;
    }) (builtins.filter (name: toLower name != name) (builtins.attrNames pkgs))
  );

  lookup = builtins.foldl' (
    found: component:
    if found != null && builtins.isAttrs found && builtins.hasAttr component found then
      builtins.getAttr component found
    else
      null
  ) pkgs;

  find =
    path:
    let
      exact = lookup path;
    in
    if exact != null then exact else lookup (map (c: spellings.${c} or c) path);

  isDerivation = value: builtins.isAttrs value && (value.type or null) == "derivation";

  describe =
    request:
    let
      found = find request.path;
    in
    if found == null then
      {
        inherit (request) name;
        status = "missing";
      }
    else if !(isDerivation found) then
      {
        inherit (request) name;
        status = "notPackage";
      }
    else
      {
        inherit (request) name;
        status = "ok";
        drv = found.drvPath;
        out = found.outPath;
        output = found.outputName or "out";
      };
in
map describe (builtins.fromJSON packages)
