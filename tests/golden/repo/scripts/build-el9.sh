(
umask 022
R=/srv/homeclust-repo/rhel
S=/var/lib/homeclust/repo
WANTED='iptables-nft jq'
mkdir -p "$R" "$S" || exit 1
hc_listing() { ls -1 "$R" | grep -E "$1" | sort | cksum; }
before=$(hc_listing '[.]rpm$')
if [ 0 = 1 ]; then dnf -q makecache --refresh && touch /var/lib/homeclust/repo/refreshed || exit 1; fi
# shellcheck disable=SC2086
dnf -q download --resolve --alldeps --destdir "$R" $WANTED || exit 1
if [ "$before" != "$(hc_listing '[.]rpm$')" ] || [ ! -s "$R/repodata/repomd.xml" ]; then
  createrepo_c -q --update "$R" || exit 1
  echo "index written"
fi
{
  echo '# homeclust repo step: what the workers package repository holds; do not edit'
  echo "dir $R"
  echo "index repodata/repomd.xml"
  echo "wanted $WANTED"
  for f in "$R"/*.rpm; do
    [ -e "$f" ] || continue
    rpm -qp --nosignature --nodigest \
      --qf 'pkg %{NAME} %{EPOCHNUM}:%{VERSION}-%{RELEASE} %{ARCH} ' "$f" &&
      echo "${f##*/}" || exit 1
  done
} > /var/lib/homeclust/repo/manifest.new || exit 1
if cmp -s /var/lib/homeclust/repo/manifest.new /var/lib/homeclust/repo/manifest; then rm -f /var/lib/homeclust/repo/manifest.new
else mv -f /var/lib/homeclust/repo/manifest.new /var/lib/homeclust/repo/manifest || exit 1; echo "manifest updated"; fi
)
