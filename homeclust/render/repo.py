"""The workers' package repository on the master: configuration files and scripts (pure).

Layout on the master (both families):

* ``/srv/homeclust-repo/debian/`` or ``/srv/homeclust-repo/rhel/``: the
  packages, with the index (``Packages`` + signed ``InRelease``; ``repodata/``),
  served by nginx on the private address only (``/etc/nginx/nginx.conf``,
  written whole: nothing else of nginx's defaults listens anywhere);
* ``/var/lib/homeclust/repo/``: the manifest (what was asked for and what was
  resolved), the cluster's repository signing key (Debian family; the private
  half is a secret), the refresh stamp.

On the workers: one package source naming only the master
(``/etc/apt/sources.list.d/homeclust.sources`` trusting exactly the cluster
key through ``Signed-By``; ``/etc/yum.repos.d/homeclust.repo`` with
``gpgcheck=1`` and the distribution's keys); their original sources are kept
in ``/var/lib/homeclust/package-sources-orig/``.

The build scripts run on the master as one shell command each.  They are
incremental on the host: packages already in the repository are not
downloaded again, and the index is rewritten (and re-signed) only when the
set of files changed.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from homeclust.inventory import Inventory
from homeclust.platforms import Platform

WEB_ROOT = "/srv/homeclust-repo"
STATE_DIR = "/var/lib/homeclust/repo"
MANIFEST = f"{STATE_DIR}/manifest"
#: The private half of the cluster's repository key (Debian family): a secret that never
#: leaves the master -- the facts report whether it is there, never what it holds.
SIGNING_KEY = f"{STATE_DIR}/signing-key.asc"
#: Its public half, read through the master's facts and installed on every worker.
PUBLIC_KEY = f"{STATE_DIR}/signing-key.pub.asc"
#: Touched after every successful refresh of the master's package lists.
REFRESHED = f"{STATE_DIR}/refreshed"
#: An empty dpkg status: apt resolves the closure as for a system with nothing installed.
EMPTY_STATUS = f"{STATE_DIR}/empty-status"
NGINX_CONF = "/etc/nginx/nginx.conf"

WORKER_KEYRING = "/etc/apt/keyrings/homeclust-repo.asc"
APT_SOURCES = "/etc/apt/sources.list.d/homeclust.sources"
APT_SOURCES_LIST = "/etc/apt/sources.list"
APT_SOURCES_DIR = "/etc/apt/sources.list.d"
YUM_REPO = "/etc/yum.repos.d/homeclust.repo"
YUM_REPOS_DIR = "/etc/yum.repos.d"
#: Where the workers' original package sources are kept (restore: see the README).
ORIGINALS = "/var/lib/homeclust/package-sources-orig"

MANIFEST_HEADER = "# homeclust repo step: what the workers package repository holds; do not edit"


def repo_dir(platform: Platform) -> str:
    return f"{WEB_ROOT}/{platform.family}"


def repo_url(inventory: Inventory, platform: Platform) -> str:
    return f"http://{inventory.master.private_address}/{platform.family}/"


def index_files(platform: Platform) -> tuple[str, ...]:
    """The index files (relative to :func:`repo_dir`) a complete repository has."""
    if platform.family == "debian":
        return ("Packages", "InRelease")
    return ("repodata/repomd.xml",)


def apt_list_path(inventory: Inventory) -> str:
    """Where apt keeps a worker's copy of the master's ``InRelease`` (apt's own naming:
    the URI with ``/`` as ``_``; ``.`` is the flat repository's suite)."""
    return f"/var/lib/apt/lists/{inventory.master.private_address}_debian_._InRelease"


# --------------------------------------------------------------------------- master


def render_nginx_conf(inventory: Inventory, platform: Platform) -> str:
    """nginx serving only the repository, only on the master's private address.

    Written whole, without the distribution's ``sites-enabled``/``conf.d``
    includes: their default server listens on every address.  The firewall
    keeps the public side closed as well -- both must hold.
    """
    return f"""\
# Managed by homeclust (repo step): nginx serves only the workers' package
# repository, only on the private network.  Edit the inventory, not this file.
user {platform.nginx_user};
worker_processes 1;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log;

events {{
    worker_connections 256;
}}

http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    sendfile on;
    server_tokens off;
    access_log /var/log/nginx/access.log;

    server {{
        listen {inventory.master.private_address}:80;
        server_name _;
        root {WEB_ROOT};
        autoindex off;
        location / {{
            try_files $uri =404;
        }}
    }}
}}
"""


def _quoted_words(words: Sequence[str]) -> str:
    return shlex.quote(" ".join(words))


_SIGN_FUNCTION = f"""\
hc_gpg_home() {{ h=$(mktemp -d) || return 1; }}
hc_gpg_done() {{ gpgconf --homedir "$h" --kill gpg-agent >/dev/null 2>&1; rm -rf "$h"; }}
hc_sign() {{
  # Clear-sign $1 into $2 with the cluster key (a throw-away keyring: the key file
  # is the only copy of the secret).
  hc_gpg_home || return 1
  if gpg --homedir "$h" --batch --quiet --no-secmem-warning --import {SIGNING_KEY} &&
     gpg --homedir "$h" --batch --quiet --yes --no-secmem-warning --pinentry-mode loopback \\
       --passphrase '' --clearsign -o "$2" "$1"; then rc=0; else rc=1; fi
  hc_gpg_done
  return $rc
}}
"""


def key_script(inventory: Inventory) -> str:
    """Create the cluster's repository signing key once (Debian family), on the master.

    The private key never leaves the master (mode 600); its public half is
    exported next to it for the workers.  A new key removes the old signature
    of the index, so the build signs it again.
    """
    uid = f"homeclust cluster repository ({inventory.cluster.name}) <root@{inventory.master.name}>"
    return f"""(
umask 077
mkdir -p {STATE_DIR} || exit 1
{_SIGN_FUNCTION}if [ ! -s {SIGNING_KEY} ]; then
  hc_gpg_home || exit 1
  if gpg --homedir "$h" --batch --quiet --no-secmem-warning --pinentry-mode loopback \\
       --passphrase '' --quick-gen-key {shlex.quote(uid)} ed25519 sign never &&
     gpg --homedir "$h" --batch --armor --export-secret-keys > {SIGNING_KEY}.tmp &&
     [ -s {SIGNING_KEY}.tmp ] && mv -f {SIGNING_KEY}.tmp {SIGNING_KEY}; then rc=0; else rc=1; fi
  hc_gpg_done
  [ $rc = 0 ] || {{ rm -f {SIGNING_KEY}.tmp; exit 1; }}
  rm -f {PUBLIC_KEY} {WEB_ROOT}/debian/InRelease
  echo "created the cluster repository key"
fi
if [ ! -s {PUBLIC_KEY} ]; then
  hc_gpg_home || exit 1
  if gpg --homedir "$h" --batch --quiet --no-secmem-warning --import {SIGNING_KEY} &&
     gpg --homedir "$h" --batch --armor --export > {PUBLIC_KEY}.tmp &&
     [ -s {PUBLIC_KEY}.tmp ] && chmod 644 {PUBLIC_KEY}.tmp &&
     mv -f {PUBLIC_KEY}.tmp {PUBLIC_KEY}; then rc=0; else rc=1; fi
  hc_gpg_done
  [ $rc = 0 ] || exit 1
fi
)"""


_LISTING = "hc_listing() { ls -1 \"$R\" | grep -E \"$1\" | sort | cksum; }\n"

_WRITE_MANIFEST = f"""\
if cmp -s {MANIFEST}.new {MANIFEST}; then rm -f {MANIFEST}.new
else mv -f {MANIFEST}.new {MANIFEST} || exit 1; echo "manifest updated"; fi
"""


def build_script_debian(inventory: Inventory, wanted: Sequence[str], *, update: bool) -> str:
    """Download the closure of ``wanted`` into the repository, index it, sign it.

    The closure is what a system with *nothing* installed would need (apt with
    an empty dpkg status, first alternatives, no recommends): everything a
    freshly installed worker may lack, like the guide's ``repotrack``.  apt's
    own download cache is the repository directory, so files already there
    are not downloaded again; files no longer in the closure are removed.
    ``update``: refresh the master's package lists first (also done, once,
    when resolving or downloading fails on stale lists).
    """
    label = f"homeclust {inventory.cluster.name}"
    return f"""(
umask 022
R={WEB_ROOT}/debian
S={STATE_DIR}
WANTED={_quoted_words(wanted)}
mkdir -p "$R/partial" "$S" || exit 1
[ -e {EMPTY_STATUS} ] || : > {EMPTY_STATUS} || exit 1
{_SIGN_FUNCTION}{_LISTING}hc_apt() {{
  apt-get -q -o Dir::State::status={EMPTY_STATUS} \\
    -o Dir::State::extended_states="$S/extended_states" -o Dir::Cache::pkgcache= \\
    -o Dir::Cache::archives="$R" -o APT::Install-Recommends=false "$@"
}}
hc_update() {{
  apt-get -q -o APT::Update::Error-Mode=any update && touch {REFRESHED}
}}
hc_fetch() {{
  # shellcheck disable=SC2086
  hc_apt -s install $WANTED > "$S/resolve.log" 2>&1 || {{ cat "$S/resolve.log"; return 1; }}
  # "Inst NAME (VERSION SUITE[, SUITE...] [ARCH])", maybe followed by " []".
  awk '$1 == "Inst" {{ v = $3; sub(/^\\(/, "", v); a = "";
    for (i = 4; i <= NF; i++)
      if ($i ~ /^\\[.*\\]\\)$/) {{ a = $i; sub(/^\\[/, "", a); sub(/\\]\\)$/, "", a) }}
    print $2, v, a }}' "$S/resolve.log" | sort > "$S/closure" || return 1
  if awk 'NF != 3 {{ bad = 1 }} END {{ exit !bad }}' "$S/closure"; then
    echo "homeclust: cannot read apt's resolution:"; cat "$S/resolve.log"; return 1
  fi
  [ -s "$S/closure" ] || {{ echo "homeclust: nothing resolved for: $WANTED"; return 1; }}
  # shellcheck disable=SC2086
  hc_apt -y -d install $WANTED
}}
before=$(hc_listing '[.]deb$')
if [ {int(update)} = 1 ]; then hc_update || exit 1; fi
if ! hc_fetch; then
  [ {int(update)} = 1 ] && exit 1
  echo "homeclust: retrying with fresh package lists"
  hc_update && hc_fetch || exit 1
fi
# apt names the files NAME_VERSION_ARCH.deb, with an epoch's colon as %3a.
awk '{{ v = $2; gsub(/:/, "%3a", v); print $1 "_" v "_" $3 ".deb" }}' "$S/closure" > "$S/files" \\
  || exit 1
for f in "$R"/*.deb; do
  [ -e "$f" ] || continue
  grep -qxF "${{f##*/}}" "$S/files" || {{ rm -f "$f" && echo "removed ${{f##*/}}"; }} || exit 1
done
while read -r f; do
  [ -s "$R/$f" ] || {{ echo "homeclust: $f is missing after the download"; exit 1; }}
done < "$S/files"
if [ "$before" != "$(hc_listing '[.]deb$')" ] || [ ! -s "$R/Packages" ] || [ ! -s "$R/InRelease" ]
then
  rm -rf "$S/index" && mkdir "$S/index" || exit 1
  (cd "$R" && apt-ftparchive packages .) > "$S/index/Packages" || exit 1
  apt-ftparchive -o APT::FTPArchive::Release::Origin=homeclust \\
    -o APT::FTPArchive::Release::Label={shlex.quote(label)} \\
    release "$S/index" > "$S/Release" || exit 1
  hc_sign "$S/Release" "$S/InRelease" || exit 1
  mv -f "$S/index/Packages" "$R/Packages" && mv -f "$S/Release" "$R/Release" &&
    mv -f "$S/InRelease" "$R/InRelease" || exit 1
  rm -rf "$S/index"
  echo "index written and signed: $(wc -l < "$S/files") packages"
fi
{{
  echo {shlex.quote(MANIFEST_HEADER)}
  echo "dir $R"
  echo "index Packages"
  echo "index InRelease"
  echo "wanted $WANTED"
  awk '{{ v = $2; gsub(/:/, "%3a", v); print "pkg", $1, $2, $3, $1 "_" v "_" $3 ".deb" }}' \\
    "$S/closure"
}} > {MANIFEST}.new || exit 1
{_WRITE_MANIFEST})"""


def build_script_rhel(platform: Platform, wanted: Sequence[str], *, update: bool) -> str:
    """The guide's ``repotrack`` + ``createrepo`` (CentOS 7), or ``dnf download --resolve
    --alldeps`` + ``createrepo_c`` (EL8+): every dependency, installed here or not.

    Files already present are not downloaded again; older versions stay in the
    repository (dnf/yum pick the newest).  The packages keep the vendor's
    signatures, which the workers check (``gpgcheck=1``).
    """
    if platform.major == 7:
        refresh = "yum -q makecache fast"
        fetch = 'repotrack -a "$(uname -m)" -p "$R" $WANTED'
        index = 'createrepo -q --update "$R"'
    else:
        refresh = "dnf -q makecache --refresh"
        fetch = 'dnf -q download --resolve --alldeps --destdir "$R" $WANTED'
        index = 'createrepo_c -q --update "$R"'
    return f"""(
umask 022
R={WEB_ROOT}/rhel
S={STATE_DIR}
WANTED={_quoted_words(wanted)}
mkdir -p "$R" "$S" || exit 1
{_LISTING}before=$(hc_listing '[.]rpm$')
if [ {int(update)} = 1 ]; then {refresh} && touch {REFRESHED} || exit 1; fi
# shellcheck disable=SC2086
{fetch} || exit 1
if [ "$before" != "$(hc_listing '[.]rpm$')" ] || [ ! -s "$R/repodata/repomd.xml" ]; then
  {index} || exit 1
  echo "index written"
fi
{{
  echo {shlex.quote(MANIFEST_HEADER)}
  echo "dir $R"
  echo "index repodata/repomd.xml"
  echo "wanted $WANTED"
  for f in "$R"/*.rpm; do
    [ -e "$f" ] || continue
    rpm -qp --nosignature --nodigest \\
      --qf 'pkg %{{NAME}} %{{EPOCHNUM}}:%{{VERSION}}-%{{RELEASE}} %{{ARCH}} ' "$f" &&
      echo "${{f##*/}}" || exit 1
  done
}} > {MANIFEST}.new || exit 1
{_WRITE_MANIFEST})"""


#: Read-only: what the master's package lists offer now for the manifest's packages,
#: which manifest files are missing, how old the last refresh is.  Does nothing
#: (prints nothing) on hosts without a manifest, i.e. everywhere but the master.
REPO_STATE_COMMAND = f"""\
[ -s {SIGNING_KEY} ] && echo "signing-key present"
m={MANIFEST}
[ -f "$m" ] || exit 0
if [ -f {REFRESHED} ]; then echo "refreshed $(( $(date +%s) - $(stat -c %Y {REFRESHED}) ))"; fi
dir=$(awk '$1 == "dir" {{ print $2 }}' "$m")
awk '$1 == "pkg" {{ print $5 }} $1 == "index" {{ print $2 }}' "$m" | while read -r f; do
  [ -s "$dir/$f" ] || echo "missing $f"
done
names=$(awk '$1 == "pkg" {{ print $2 }}' "$m" | sort -u)
[ -n "$names" ] || exit 0
if command -v apt-cache >/dev/null 2>&1; then
  # With the repository's empty status: the versions the closure would resolve to,
  # whatever the master itself has installed.
  apt-cache -o Dir::State::status={EMPTY_STATUS} -o Dir::Cache::pkgcache= policy $names |
    awk '/^[^ ]/ {{ n = $1; sub(/:$/, "", n) }} $1 == "Candidate:" {{ print "candidate", n, $2 }}'
elif command -v dnf >/dev/null 2>&1; then
  dnf -q -C repoquery --available --latest-limit 1 \\
    --qf 'candidate %{{name}} %{{epoch}}:%{{version}}-%{{release}}' $names
elif command -v repoquery >/dev/null 2>&1; then
  repoquery -C --qf 'candidate %{{name}} %{{epoch}}:%{{version}}-%{{release}}' $names
fi"""

#: Read-only: the local addresses something listens on for TCP port 80.
HTTP_LISTENERS_COMMAND = "ss -ltn | awk 'NR > 1 && $4 ~ /:80$/ { print $4 }'"


# --------------------------------------------------------------------------- workers


def render_apt_sources(inventory: Inventory, platform: Platform) -> str:
    """The master's flat repository, trusting exactly the cluster key (never trusted=yes)."""
    return f"""\
# Managed by homeclust (repo step): the master's package repository is this
# node's only package source.  The original sources are in {ORIGINALS}/.
Types: deb
URIs: {repo_url(inventory, platform)}
Suites: ./
Signed-By: {WORKER_KEYRING}
"""


APT_SOURCES_LIST_STUB = f"""\
# Managed by homeclust (repo step): this node installs packages only from the
# master's repository ({APT_SOURCES}).  The original sources
# are in {ORIGINALS}/; to go back to them:
#   cp -a {ORIGINALS}/. /etc/apt/ && rm -f {APT_SOURCES} && apt-get update
"""


def render_yum_repo(inventory: Inventory, platform: Platform, keys: Sequence[str]) -> str:
    """The master's repository with the vendor's signatures checked (never gpgcheck=0).

    ``metadata_expire=0``: the metadata is a few KiB away on the private
    network, so workers see what the master added at once.
    """
    gpgkey = " ".join(f"file://{key}" for key in keys)
    return f"""\
# Managed by homeclust (repo step): the master's package repository is this
# node's only package source.  The original repositories are in
# {ORIGINALS}/yum.repos.d/.
[homeclust]
name=homeclust cluster repository on {inventory.master.name}
baseurl={repo_url(inventory, platform)}
enabled=1
gpgcheck=1
repo_gpgcheck=0
gpgkey={gpgkey}
metadata_expire=0
"""


def keep_aside_command(paths: Sequence[str], family: str) -> str:
    """Move original package sources into :data:`ORIGINALS` (kept, never deleted)."""
    if family == "debian":
        def target(path: str) -> str:
            return f"{ORIGINALS}/{path.removeprefix('/etc/apt/')}"
    else:
        def target(path: str) -> str:
            return f"{ORIGINALS}/yum.repos.d/{path.rsplit('/', 1)[-1]}"
    dirs = sorted({target(p).rsplit("/", 1)[0] for p in paths})
    lines = [f"mkdir -p {' '.join(shlex.quote(d) for d in dirs)}"]
    lines += [f"mv -f {shlex.quote(p)} {shlex.quote(target(p))}" for p in paths]
    return " && ".join(lines)


APT_UPDATE_COMMAND = "apt-get -q -o APT::Update::Error-Mode=any update"


def apt_verify_probe(inventory: Inventory, platform: Platform) -> str:
    """Fetch the master's index into a scratch directory and verify it as apt does
    (signature against exactly the installed cluster key, hashes); changes nothing."""
    return f"""\
t=$(mktemp -d) || exit 1
trap 'rm -rf "$t"' EXIT
mkdir -p "$t/lists/partial" "$t/parts" "$t/cache/archives/partial" || exit 1
cp {APT_SOURCES} "$t/parts/" || {{ echo "no {APT_SOURCES}"; exit 1; }}
apt-get -q -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$t/parts" \\
  -o Dir::State::Lists="$t/lists" -o Dir::Cache="$t/cache" -o Dir::Cache::pkgcache= \\
  -o Dir::Cache::srcpkgcache= -o APT::Sandbox::User=root -o Debug::NoLocking=1 \\
  -o APT::Update::Error-Mode=any update 2>&1 || exit 1
n=$(grep -c '^Package:' "$t"/lists/*_Packages 2>/dev/null)
echo "verified {repo_url(inventory, platform)}InRelease: ${{n:-0}} packages"
"""


def yum_verify_probe(inventory: Inventory, platform: Platform) -> str:
    """Fetch the master's repository metadata into a scratch cache (changes nothing)."""
    tool = "yum" if platform.major == 7 else "dnf"
    return f"""\
t=$(mktemp -d) || exit 1
trap 'rm -rf "$t"' EXIT
grep -qx 'gpgcheck=1' {YUM_REPO} || {{ echo "{YUM_REPO} does not check signatures"; exit 1; }}
{tool} -q --disablerepo='*' --enablerepo=homeclust --setopt=cachedir="$t" makecache 2>&1 \\
  || exit 1
echo "fetched {repo_url(inventory, platform)}repodata/repomd.xml (packages: gpgcheck=1)"
"""
