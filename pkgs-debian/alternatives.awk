# Reads a Debian maintainer script (postinst) and prints, for each
# `update-alternatives --install LINK NAME PATH PRIORITY [--slave LINK NAME
# PATH]...` it runs with literal arguments, one line:
#   NAME PRIORITY LINK PATH [SLAVE-LINK SLAVE-PATH]...
# Calls whose arguments come from shell variables are left out.
{ line = line " " $0 }
/\\$/ { sub(/\\$/, "", line); next }
{
  if (line ~ /update-alternatives/ && line ~ /--install/) emit(line)
  line = ""
}
function emit(text,    words, n, i, out) {
  n = split(text, words, /[ \t]+/)
  for (i = 1; i <= n && words[i] != "--install"; i++) {}
  if (i + 4 > n) return
  out = words[i + 2] " " words[i + 4] " " words[i + 1] " " words[i + 3]
  for (i += 5; i <= n; i++) {
    if (words[i] == "--slave" && i + 3 <= n) {
      out = out " " words[i + 1] " " words[i + 3]
      i += 3
    } else if (words[i] != "") {
      break
    }
  }
  if (out ~ /[$`"'(){};&|]/) return
  print out
}
