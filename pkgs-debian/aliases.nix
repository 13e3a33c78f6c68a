# The nixpkgs names of packages, for the Debian packages that have their
# programs: name -> the Debian packages of its environment. Every Debian
# package of the set is an attribute under its own name as well.
{
  bashInteractive = [ "bash" ];
  cacert = [ "ca-certificates" ];
  iana-etc = [ "netbase" ];
  openssh = [ "openssh-client" "openssh-server" ];
  gnumake = [ "make" ];
  sqlite = [ "sqlite3" ];
  gnugrep = [ "grep" ];
  gnused = [ "sed" ];
  which = [ "debianutils" ];
}
