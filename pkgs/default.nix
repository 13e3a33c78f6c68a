# The offline package set nixery ships for its quick start and its tests.
#
# No nixpkgs and no network: every package is a plain `derivation` built by the
# host's static busybox (Debian's busybox-static), copied into the Nix store.
# The programs are busybox applets or small busybox-sh scripts standing in for
# the real packages of the same name; each package's description says which.
# Several packages carry deterministic filler files and refer to one another,
# so closures have the shape of real ones: shared library-like paths used by
# many packages, sizes from a few KB to a few MB, empty directories and long
# file names.
#
# Called like nixpkgs: `import ./pkgs { system = "x86_64-linux"; }`.
{
  system ? builtins.currentSystem,
  # Host files imported into the store. Change them to build on another host.
  busyboxBinary ? /usr/bin/busybox,
  caBundle ? /etc/ssl/certs/ca-certificates.crt,
}:
let
  # busybox chooses the applet from argv[0], and Nix runs a builder under its
  # own file name, so the binary is copied in a folder where it is `busybox`.
  busyboxStatic = builtins.path {
    name = "busybox-static-bin";
    path = dirOf busyboxBinary;
    filter = path: _type: baseNameOf path == baseNameOf busyboxBinary;
  };
  hostBusybox = "${busyboxStatic}/${baseNameOf busyboxBinary}";

  # A package: `script` runs in busybox sh with the busybox applets on PATH and
  # writes $out. `meta` carries what nixpkgs packages carry.
  mkPackage =
    {
      pname,
      version,
      description,
      script,
      mainProgram ? pname,
      license ? null,
      homepage ? null,
    }:
    derivation {
      name = "${pname}-${version}";
      inherit system;
      builder = hostBusybox;
      args = [
        "sh"
        "-euc"
        script
      ];
      PATH = "${busybox}/bin";
    }
    // {
      inherit pname version;
      meta = {
        inherit description mainProgram;
      }
      // (if license == null then { } else { inherit license; })
      // (if homepage == null then { } else { inherit homepage; });
    };

  # Writes `$out/<file>`: `kib` KiB of deterministic pseudo-random hex text
  # (a linear congruential generator seeded by `seed`), after a first line
  # naming `deps`, so that Nix records them as references.
  filler = file: seed: kib: deps: ''
    mkdir -p "$(dirname "$out/${file}")"
    {
      echo "needs: ${toString deps}"
      awk 'BEGIN { x = ${toString seed}; for (i = 0; i < ${toString kib} * 128; i++) { x = (x * 69069 + 1) % 4294967296; printf "%08x", x } }'
    } > "$out/${file}"
  '';

  # A script `$out/bin/<name>` run by busybox sh.
  script = name: body: ''
    mkdir -p $out/bin
    cat > $out/bin/${name} <<'NIXERY_EOF'
    #!${busybox}/bin/sh
    ${body}
    NIXERY_EOF
    chmod 0555 $out/bin/${name}
  '';

  busybox =
    derivation {
      name = "busybox-static-1.35.0";
      inherit system;
      builder = hostBusybox;
      args = [
        "sh"
        "-euc"
        ''
          bb=$builder
          $bb mkdir -p $out/bin
          $bb cp $bb $out/bin/busybox
          $bb chmod 0555 $out/bin/busybox
          for applet in $($bb --list); do
            [ "$applet" = busybox ] || $bb ln -s busybox $out/bin/$applet
          done
        ''
      ];
    }
    // {
      pname = "busybox";
      version = "1.35.0";
      meta = {
        description = "Debian's static busybox with every applet linked in bin/";
        mainProgram = "busybox";
      };
    };

  # Links `$out/bin/<applet>` to busybox for each applet in `applets`.
  appletLinks = applets: ''
    mkdir -p $out/bin
    for applet in ${toString applets}; do
      ln -s ${busybox}/bin/busybox $out/bin/$applet
    done
  '';

  zlib = mkPackage {
    pname = "zlib";
    version = "1.3.1";
    description = "Stand-in for zlib: a 96 KiB library-like file";
    script = filler "lib/libz.so.1" 11 96 [ ];
  };

  pcre2 = mkPackage {
    pname = "pcre2";
    version = "10.42";
    description = "Stand-in for PCRE2: a 640 KiB library-like file";
    script = filler "lib/libpcre2-8.so.0" 12 640 [ ];
  };

  openssl = mkPackage {
    pname = "openssl";
    version = "3.0.15";
    description = "Stand-in for OpenSSL: libssl and libcrypto-like files using zlib";
    script =
      filler "lib/libcrypto.so.3" 13 2048 [ zlib ]
      + filler "lib/libssl.so.3" 14 320 [ zlib ]
      + "mkdir -p $out/etc/ssl/private\n";
  };

  ncurses = mkPackage {
    pname = "ncurses";
    version = "6.4";
    description = "Stand-in for ncurses: a library-like file and a terminfo tree of small files";
    script =
      filler "lib/libncursesw.so.6" 15 384 [ ]
      + ''
        for t in ansi dumb linux screen vt100 vt220 xterm xterm-256color; do
          d=$out/share/terminfo/$(echo $t | cut -c1)
          mkdir -p $d
          echo "terminal $t" > $d/$t
        done
      '';
  };

  curl = mkPackage {
    pname = "curl";
    version = "8.11.1";
    description = "Stand-in for curl: a busybox-sh script and a libcurl-like file using OpenSSL and zlib";
    script =
      filler "lib/libcurl.so.4" 16 512 [
        openssl
        zlib
      ]
      + script "curl" ''echo "curl 8.11.1 (nixery test package, using ${openssl} and ${zlib})"'';
  };

  python3 = mkPackage {
    pname = "python3";
    version = "3.12.8";
    description = "Stand-in for CPython: a 3 MiB library-like file and a busybox-sh script";
    mainProgram = "python3";
    script =
      filler "lib/libpython3.12.so.1.0" 17 3072 [
        zlib
        openssl
        ncurses
      ]
      + script "python3" ''echo "Python 3.12.8 (nixery test package)"'';
  };

  openblas = mkPackage {
    pname = "openblas";
    version = "0.3.28";
    description = "Stand-in for OpenBLAS: a 2 MiB library-like file";
    script = filler "lib/libopenblas.so.0" 18 2048 [ ];
  };

  # A nested set whose own name has upper case, as nixpkgs' python3Packages.
  python3Packages = {
    numpy = mkPackage {
      pname = "python3.12-numpy";
      version = "2.1.3";
      description = "Stand-in for numpy: a module tree using python3 and OpenBLAS";
      script =
        filler "lib/python3.12/site-packages/numpy/core/_multiarray_umath.so" 19 1024 [
          python3
          openblas
        ]
        + ''echo "__version__ = '2.1.3'" > $out/lib/python3.12/site-packages/numpy/__init__.py'';
    };
  };

in
{
  inherit
    busybox
    zlib
    pcre2
    openssl
    ncurses
    curl
    python3
    openblas
    python3Packages
    ;

  bashInteractive = mkPackage {
    pname = "bash-interactive";
    version = "5.2";
    description = "Stand-in for bash: bin/bash runs busybox's ash shell";
    mainProgram = "bash";
    script = script "bash" ''exec ${busybox}/bin/sh "$@"'';
  };

  coreutils = mkPackage {
    pname = "coreutils";
    version = "9.5";
    description = "Stand-in for GNU coreutils: the busybox applets of the same names";
    script = appletLinks [
      "basename"
      "cat"
      "chmod"
      "chown"
      "cp"
      "cut"
      "date"
      "df"
      "dirname"
      "du"
      "echo"
      "env"
      "expr"
      "false"
      "head"
      "id"
      "ln"
      "ls"
      "mkdir"
      "mktemp"
      "mv"
      "printf"
      "pwd"
      "readlink"
      "rm"
      "rmdir"
      "sha256sum"
      "sleep"
      "sort"
      "stat"
      "tail"
      "tee"
      "test"
      "touch"
      "tr"
      "true"
      "uname"
      "uniq"
      "wc"
      "whoami"
    ];
  };

  moreutils = mkPackage {
    pname = "moreutils";
    version = "0.69";
    description = "Stand-in for moreutils: sponge and ifne as busybox-sh scripts";
    mainProgram = "sponge";
    script =
      script "sponge" ''
        tmp=$(${busybox}/bin/mktemp)
        ${busybox}/bin/cat > "$tmp"
        if [ $# -gt 0 ]; then ${busybox}/bin/mv "$tmp" "$1"; else ${busybox}/bin/cat "$tmp"; ${busybox}/bin/rm "$tmp"; fi
      ''
      + script "ifne" ''
        tmp=$(${busybox}/bin/mktemp)
        ${busybox}/bin/cat > "$tmp"
        if [ -s "$tmp" ]; then "$@" < "$tmp"; status=$?; else status=0; fi
        ${busybox}/bin/rm "$tmp"
        exit $status
      '';
  };

  nano = mkPackage {
    pname = "nano";
    version = "8.2";
    description = "Stand-in for nano: bin/nano runs busybox vi";
    script = script "nano" ''exec ${busybox}/bin/vi "$@"'';
  };

  cacert = mkPackage {
    pname = "nss-cacert";
    version = "3.107";
    description = "The host's CA bundle at etc/ssl/certs/ca-bundle.crt";
    script = ''
      mkdir -p $out/etc/ssl/certs
      cp ${
        builtins.path {
          name = "ca-bundle.crt";
          path = caBundle;
        }
      } $out/etc/ssl/certs/ca-bundle.crt
      ln -s ca-bundle.crt $out/etc/ssl/certs/ca-certificates.crt
    '';
  };

  iana-etc = mkPackage {
    pname = "iana-etc";
    version = "20240318";
    description = "A short etc/services and etc/protocols with the common IANA entries";
    script = ''
      mkdir -p $out/etc
      cat > $out/etc/protocols <<'EOF'
      ip	0	IP
      icmp	1	ICMP
      tcp	6	TCP
      udp	17	UDP
      ipv6	41	IPv6
      ipv6-icmp	58	IPv6-ICMP
      EOF
      cat > $out/etc/services <<'EOF'
      ssh	22/tcp
      smtp	25/tcp
      domain	53/tcp
      domain	53/udp
      http	80/tcp
      ntp	123/udp
      https	443/tcp
      postgresql	5432/tcp
      EOF
    '';
  };

  hello = mkPackage {
    pname = "hello";
    version = "2.12.1";
    description = "Stand-in for GNU hello: a busybox-sh script that prints a greeting";
    # What GNU hello's meta says, as nixpkgs' lib.licenses spells it.
    license = {
      spdxId = "GPL-3.0-or-later";
      shortName = "gpl3Plus";
    };
    homepage = "https://www.gnu.org/software/hello/manual/";
    script = script "hello" ''echo "Hello, world!"'';
  };

  git = mkPackage {
    pname = "git";
    version = "2.47.1";
    description = "Stand-in for git: a busybox-sh script and a libexec tree using curl, OpenSSL, zlib and PCRE2";
    license = [
      { spdxId = "GPL-2.0-only"; }
      { spdxId = "LGPL-2.1-or-later"; }
    ];
    homepage = "https://git-scm.com/";
    script =
      script "git" ''echo "git version 2.47.1 (nixery test package)"''
      + filler "libexec/git-core/git-remote-https" 20 768 [
        curl
        openssl
        zlib
        pcre2
      ]
      + ''
        mkdir -p $out/share/git-core/templates/branches
        mkdir -p $out/share/doc/git
        echo "long file name" > "$out/share/doc/git/a-rather-long-file-name-that-makes-the-whole-store-path-longer-than-one-hundred-bytes.txt"
      '';
  };

  htop = mkPackage {
    pname = "htop";
    version = "3.3.0";
    description = "Stand-in for htop: a busybox-sh script running busybox top, using ncurses";
    script = script "htop" ''
      # uses ${ncurses}/lib/libncursesw.so.6
      exec ${busybox}/bin/top "$@"
    '';
  };

  # A nested set, as nixpkgs' `xorg` or `haskellPackages`.
  tools = {
    jq = mkPackage {
      pname = "jq";
      version = "1.7.1";
      description = "Stand-in for jq: a busybox-sh script that prints its input";
      script = script "jq" ''exec ${busybox}/bin/cat'';
    };
    ripgrep = mkPackage {
      pname = "ripgrep";
      version = "14.1.1";
      description = "Stand-in for ripgrep: a busybox-sh script running busybox grep -r, using PCRE2";
      mainProgram = "rg";
      script = script "rg" ''
        # uses ${pcre2}/lib/libpcre2-8.so.0
        exec ${busybox}/bin/grep -r "$@"
      '';
    };
  };

  # A name that starts with a digit: requested as `7zip`, looked up as `_7zip`.
  _7zip = mkPackage {
    pname = "7zip";
    version = "24.08";
    description = "Stand-in for 7-Zip: a busybox-sh script that prints its version";
    mainProgram = "7z";
    script = script "7z" ''echo "7-Zip 24.08 (nixery test package)"'';
  };

  # A package whose `meta` says what no SBOM should repeat: license
  # identifiers of JSON, HTML and junk, licenses that are no license
  # records, and a `javascript:` homepage.
  hostile-meta = mkPackage {
    pname = "hostile-meta";
    version = "1.0";
    description = ''Stand-in for a package with hostile meta: {"x": "</script><script>alert(1)</script>"}'';
    license = [
      {
        spdxId = "MIT OR <script>alert(1)</script>";
        shortName = "<b>mit</b>";
        fullName = ''{"spdxId": "MIT", "url": "javascript:alert(1)"}'';
        url = "javascript:alert(1)";
      }
      { spdxId = ''{"license": "GPL-3.0-only"}''; }
      { spdxId = "Apache-2.0"; }
      { spdxId = 42; }
      "<i>not a license record</i>"
    ];
    homepage = "javascript:alert(1)";
    script = script "hostile-meta" ''echo "hostile meta (nixery test package)"'';
  };
}
