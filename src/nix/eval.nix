# Looks up the requested packages in a package set. Each package comes with
# the attribute paths its name may mean (src/nix/attributes.rs), tried in
# order, each the way the original Nixery's prepare-image.nix does: the
# exact path first, then the same path with every component that matches a
# top-level attribute name case-insensitively replaced by that name's real
# spelling. The first path that leads to a value wins. The paths are strings
# in JSON, read with fromJSON: a name is only ever an attribute name, walked
# with getAttr from the package set. Evaluated with
# `nix-instantiate --read-write-mode --eval --strict --json`, so the
# derivations it names are written to the store, ready to realise.
#
# Returns one record per package: { name, status = "ok" | "missing" |
# "notPackage" | "evalError", drv, out, output, mainProgram, licenses,
# homepage } (all but the first two when ok; not named drvPath/outPath,
# which would make toJSON print the record as a string). `licenses` are
# the SPDX identifiers `meta.license` names; a `meta` that fails to
# evaluate gives none. With `catch`, a package whose evaluation throws is an
# "evalError"; without, the throw ends the evaluation with Nix's message.
{
  catch ? true,
  srcType,
  srcArgs,
  system,
  # JSON: [ { name = "python3packages.numpy"; paths = [ [ "python3packages.numpy" ] [ "python3packages" "numpy" ] ]; } ]
  packages,
}:
let
  imported = source: import source { inherit system; };

  # A flake's package set: legacyPackages (nixpkgs' way), else packages.
  flakePackages =
    flake: flake.legacyPackages.${system} or flake.packages.${system}
      or (throw "the flake has neither legacyPackages.${system} nor packages.${system}");

  pkgs =
    if srcType == "path" then
      imported srcArgs
    else if srcType == "tarball" then
      imported (builtins.fetchTarball srcArgs)
    else if srcType == "git" then
      imported (builtins.fetchGit (builtins.fromJSON srcArgs))
    else if srcType == "flake" then
      flakePackages (builtins.getFlake srcArgs)
    else
      throw "unknown package source type ${srcType}";

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

  findPath =
    path:
    let
      exact = lookup path;
    in
    if exact != null then exact else lookup (map (c: spellings.${c} or c) path);

  find = builtins.foldl' (found: path: if found != null then found else findPath path) null;

  isDerivation = value: builtins.isAttrs value && (value.type or null) == "derivation";

  attempt = value: if catch then builtins.tryEval value else { success = true; inherit value; };

  # Everything that can throw is attempted: the value the name leads to,
  # whether it is a derivation, and its drvPath.
  describe =
    request:
    let
      found = attempt (find request.paths);
      isPackage = attempt (isDerivation found.value);
      drv = attempt found.value.drvPath;
      mainProgram = attempt (found.value.meta.mainProgram or null);
      licenses = attempt (builtins.deepSeq spdxIds spdxIds);
      spdxIds =
        let
          license = found.value.meta.license or [ ];
          all = if builtins.isList license then license else [ license ];
        in
        builtins.filter builtins.isString (map (l: if builtins.isAttrs l then l.spdxId or null else null) all);
      homepage = attempt (
        let
          page = found.value.meta.homepage or null;
          first = if builtins.isList page && page != [ ] then builtins.head page else page;
        in
        if builtins.isString first then first else null
      );
      record = status: {
        inherit (request) name;
        inherit status;
      };
    in
    if !found.success then
      record "evalError"
    else if found.value == null then
      record "missing"
    else if !isPackage.success then
      record "evalError"
    else if !isPackage.value then
      record "notPackage"
    else if !drv.success then
      record "evalError"
    else
      record "ok"
      // {
        drv = drv.value;
        out = found.value.outPath;
        output = found.value.outputName or "out";
        mainProgram =
          if mainProgram.success && builtins.isString mainProgram.value then mainProgram.value else null;
        licenses = if licenses.success then licenses.value else [ ];
        homepage = if homepage.success then homepage.value else null;
      };
in
map describe (builtins.fromJSON packages)
