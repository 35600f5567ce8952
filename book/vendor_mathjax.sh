#!/bin/sh
# Vendor MathJax 3 from the npm registry's `mathjax` package into .cache/book_static/mathjax,
# so the built site typesets math with no network (the CDN default leaves raw TeX offline).
# Idempotent: does nothing when this version is already there. Needs `npm` (only at build time).
set -eu
VERSION=3.2.2
DEST=.cache/book_static/mathjax
[ -f "$DEST/VERSION-$VERSION" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "mathjax@$VERSION" >/dev/null && tar xzf "mathjax-$VERSION.tgz")
src="$tmp/package/es5"
mkdir -p "$tmp/out/input/tex" "$tmp/out/output/chtml/fonts" "$tmp/out/a11y"
cp "$src/tex-chtml.js" "$tmp/out/"
cp -r "$src/input/tex/extensions" "$tmp/out/input/tex/"
cp -r "$src/output/chtml/fonts/woff-v2" "$tmp/out/output/chtml/fonts/"
cp -r "$src/ui" "$tmp/out/"
cp "$src"/a11y/*.js "$tmp/out/a11y/"
cp "$tmp/package/LICENSE" "$tmp/out/"
touch "$tmp/out/VERSION-$VERSION"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.old"
[ -d "$DEST" ] && mv "$DEST" "$DEST.old"
mv "$tmp/out" "$DEST"   # written whole, then moved into place
rm -rf "$DEST.old"
echo "vendored MathJax $VERSION into $DEST ($(du -sh "$DEST" | cut -f1))"
