#!/usr/bin/env bash
# The include layering of the library (docs/architecture.md): each folder includes only the
# folders below it, core -> backend -> io -> nn -> layers -> moshi / mimi -> serve (moshi and mimi are
# siblings and do not include each other). The umbrella headers at the top (ttt.hpp, core.hpp,
# cuda.hpp, cuda.cuh, config.hpp) may include anything. Prints every violation; exits 1 if any.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)/include/ttt
rank() {
  case "$1" in
    config.hpp) echo 0 ;; core) echo 1 ;; backend) echo 2 ;; io) echo 3 ;; nn) echo 4 ;; layers) echo 5 ;;
    moshi|mimi) echo 6 ;; serve) echo 7 ;; *) echo 99 ;;
  esac
}
bad=0 checked=0
while IFS= read -r file; do
  rel=${file#"$root"/}
  dir=${rel%%/*}
  [ "$dir" = "$rel" ] && continue  # an umbrella header at the top
  from=$(rank "$dir")
  while IFS= read -r inc; do
    target=${inc#ttt/}
    tdir=${target%%/*}
    [ "$tdir" = "$target" ] && tdir=$target
    to=$(rank "$tdir")
    checked=$((checked + 1))
    if [ "$tdir" != "$dir" ] && { [ "$to" -ge "$from" ] || [ "$to" = 99 ]; }; then
      echo "layering: $rel includes $inc ($tdir is not below $dir)"
      bad=1
    fi
  done < <(grep -ho '#include "ttt/[^"]*"' "$file" | sed 's/#include "//; s/"$//')
done < <(find "$root" -name '*.hpp' -o -name '*.cuh' | sort)
echo "layering: $checked includes checked, $([ $bad = 0 ] && echo 'all go downwards' || echo 'violations above')"
exit $bad
