(
umask 022
R=/srv/homeclust-repo/debian
S=/var/lib/homeclust/repo
WANTED='iptables jq'
mkdir -p "$R/partial" "$S" || exit 1
[ -e /var/lib/homeclust/repo/empty-status ] || : > /var/lib/homeclust/repo/empty-status || exit 1
hc_gpg_home() { h=$(mktemp -d) || return 1; }
hc_gpg_done() { gpgconf --homedir "$h" --kill gpg-agent >/dev/null 2>&1; rm -rf "$h"; }
hc_sign() {
  # Clear-sign $1 into $2 with the cluster key (a throw-away keyring: the key file
  # is the only copy of the secret).
  hc_gpg_home || return 1
  if gpg --homedir "$h" --batch --quiet --no-secmem-warning --import /var/lib/homeclust/repo/signing-key.asc &&
     gpg --homedir "$h" --batch --quiet --yes --no-secmem-warning --pinentry-mode loopback \
       --passphrase '' --clearsign -o "$2" "$1"; then rc=0; else rc=1; fi
  hc_gpg_done
  return $rc
}
hc_listing() { ls -1 "$R" | grep -E "$1" | sort | cksum; }
hc_apt() {
  apt-get -q -o Dir::State::status=/var/lib/homeclust/repo/empty-status \
    -o Dir::State::extended_states="$S/extended_states" -o Dir::Cache::pkgcache= \
    -o Dir::Cache::archives="$R" -o APT::Install-Recommends=false "$@"
}
hc_update() {
  apt-get -q -o APT::Update::Error-Mode=any update && touch /var/lib/homeclust/repo/refreshed
}
hc_fetch() {
  # shellcheck disable=SC2086
  hc_apt -s install $WANTED > "$S/resolve.log" 2>&1 || { cat "$S/resolve.log"; return 1; }
  # "Inst NAME (VERSION SUITE[, SUITE...] [ARCH])", maybe followed by " []".
  awk '$1 == "Inst" { v = $3; sub(/^\(/, "", v); a = "";
    for (i = 4; i <= NF; i++)
      if ($i ~ /^\[.*\]\)$/) { a = $i; sub(/^\[/, "", a); sub(/\]\)$/, "", a) }
    print $2, v, a }' "$S/resolve.log" | sort > "$S/closure" || return 1
  if awk 'NF != 3 { bad = 1 } END { exit !bad }' "$S/closure"; then
    echo "homeclust: cannot read apt's resolution:"; cat "$S/resolve.log"; return 1
  fi
  [ -s "$S/closure" ] || { echo "homeclust: nothing resolved for: $WANTED"; return 1; }
  # shellcheck disable=SC2086
  hc_apt -y -d install $WANTED
}
before=$(hc_listing '[.]deb$')
if [ 1 = 1 ]; then hc_update || exit 1; fi
if ! hc_fetch; then
  [ 1 = 1 ] && exit 1
  echo "homeclust: retrying with fresh package lists"
  hc_update && hc_fetch || exit 1
fi
# apt names the files NAME_VERSION_ARCH.deb, with an epoch's colon as %3a.
awk '{ v = $2; gsub(/:/, "%3a", v); print $1 "_" v "_" $3 ".deb" }' "$S/closure" > "$S/files" \
  || exit 1
for f in "$R"/*.deb; do
  [ -e "$f" ] || continue
  grep -qxF "${f##*/}" "$S/files" || { rm -f "$f" && echo "removed ${f##*/}"; } || exit 1
done
while read -r f; do
  [ -s "$R/$f" ] || { echo "homeclust: $f is missing after the download"; exit 1; }
done < "$S/files"
if [ "$before" != "$(hc_listing '[.]deb$')" ] || [ ! -s "$R/Packages" ] || [ ! -s "$R/InRelease" ]
then
  rm -rf "$S/index" && mkdir "$S/index" || exit 1
  (cd "$R" && apt-ftparchive packages .) > "$S/index/Packages" || exit 1
  apt-ftparchive -o APT::FTPArchive::Release::Origin=homeclust \
    -o APT::FTPArchive::Release::Label='homeclust testclust' \
    release "$S/index" > "$S/Release" || exit 1
  hc_sign "$S/Release" "$S/InRelease" || exit 1
  mv -f "$S/index/Packages" "$R/Packages" && mv -f "$S/Release" "$R/Release" &&
    mv -f "$S/InRelease" "$R/InRelease" || exit 1
  rm -rf "$S/index"
  echo "index written and signed: $(wc -l < "$S/files") packages"
fi
{
  echo '# homeclust repo step: what the workers package repository holds; do not edit'
  echo "dir $R"
  echo "index Packages"
  echo "index InRelease"
  echo "wanted $WANTED"
  awk '{ v = $2; gsub(/:/, "%3a", v); print "pkg", $1, $2, $3, $1 "_" v "_" $3 ".deb" }' \
    "$S/closure"
} > /var/lib/homeclust/repo/manifest.new || exit 1
if cmp -s /var/lib/homeclust/repo/manifest.new /var/lib/homeclust/repo/manifest; then rm -f /var/lib/homeclust/repo/manifest.new
else mv -f /var/lib/homeclust/repo/manifest.new /var/lib/homeclust/repo/manifest || exit 1; echo "manifest updated"; fi
)
