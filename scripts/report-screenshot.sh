#!/usr/bin/env bash
# report-screenshot.sh REPORT.html OUT.png [WIDTH [HEIGHT]]: a picture of a `moetrain report` page (or any local
# HTML file) taken by headless Chromium, Debian's `chromium` package, which this script installs when it is missing
# (with sudo when not root). The page is drawn WIDTH × HEIGHT CSS pixels (default 1200 × 5000): what lies below
# HEIGHT is cut off, so give the height the page needs.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH [HEIGHT]]" >&2
  exit 2
fi
page=$1 out=$2 width=${3:-1200} height=${4:-5000}
[ -f "$page" ] || { echo "$0: $page: no such file" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "report-screenshot: installing chromium (apt)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
  browser=$(command -v chromium)
fi
abs=$(cd "$(dirname "$page")" && pwd)/$(basename "$page")
rm -f "$out"
# --no-sandbox: Chromium refuses to start as root otherwise; the page is ours and loads nothing.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --window-size="$width,$height" --screenshot="$(realpath -m "$out")" "file://$abs" 2>/dev/null
[ -s "$out" ] || { echo "$0: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "wrote $out (${width}x${height})"
