(
umask 077
mkdir -p /var/lib/homeclust/repo || exit 1
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
if [ ! -s /var/lib/homeclust/repo/signing-key.asc ]; then
  hc_gpg_home || exit 1
  if gpg --homedir "$h" --batch --quiet --no-secmem-warning --pinentry-mode loopback \
       --passphrase '' --quick-gen-key 'homeclust cluster repository (testclust) <root@master>' ed25519 sign never &&
     gpg --homedir "$h" --batch --armor --export-secret-keys > /var/lib/homeclust/repo/signing-key.asc.tmp &&
     [ -s /var/lib/homeclust/repo/signing-key.asc.tmp ] && mv -f /var/lib/homeclust/repo/signing-key.asc.tmp /var/lib/homeclust/repo/signing-key.asc; then rc=0; else rc=1; fi
  hc_gpg_done
  [ $rc = 0 ] || { rm -f /var/lib/homeclust/repo/signing-key.asc.tmp; exit 1; }
  rm -f /var/lib/homeclust/repo/signing-key.pub.asc /srv/homeclust-repo/debian/InRelease
  echo "created the cluster repository key"
fi
if [ ! -s /var/lib/homeclust/repo/signing-key.pub.asc ]; then
  hc_gpg_home || exit 1
  if gpg --homedir "$h" --batch --quiet --no-secmem-warning --import /var/lib/homeclust/repo/signing-key.asc &&
     gpg --homedir "$h" --batch --armor --export > /var/lib/homeclust/repo/signing-key.pub.asc.tmp &&
     [ -s /var/lib/homeclust/repo/signing-key.pub.asc.tmp ] && chmod 644 /var/lib/homeclust/repo/signing-key.pub.asc.tmp &&
     mv -f /var/lib/homeclust/repo/signing-key.pub.asc.tmp /var/lib/homeclust/repo/signing-key.pub.asc; then rc=0; else rc=1; fi
  hc_gpg_done
  [ $rc = 0 ] || exit 1
fi
)
