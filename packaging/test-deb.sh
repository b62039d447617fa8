#!/usr/bin/env bash
# Tests the .deb the way an image build and an administrator use it, in a
# scratch Debian root (mmdebstrap, cached under .cache/): install offline
# (chroot, no /proc, no running systemd), upgrade with an edited config and
# a provisioned state, remove, reinstall, purge. Also: lintian with no
# unexplained tag, and a second build that is bit-for-bit the same.
#
# Usage: packaging/test-deb.sh DEBDIR      (needs root: chroot)
set -euo pipefail
cd "$(dirname "$0")/.."
debdir=${1:?usage: packaging/test-deb.sh DEBDIR}
[ "$(id -u)" = 0 ] || { echo "test-deb.sh: must run as root (chroot)" >&2; exit 1; }
suite=${IMAGE_SUITE:-trixie}
deb=$(ls "$debdir"/gwagent_*_amd64.deb | head -n1)
p11=$(ls "$debdir"/gwagent-pkcs11_*_amd64.deb | head -n1)
version=$(dpkg-deb -f "$deb" Version)
fail() { echo "test-deb.sh: FAIL: $*" >&2; exit 1; }
step() { echo "test-deb.sh: $*"; }

step "lintian"
# lintian reads strings(1) of the binary for misspellings; a short "word" is
# then as likely to be a few bytes of machine code (a build once showed
# "R<k\tlik", flagged as "lik" for "link") and moves with every change to
# the code, so it can be neither fixed nor overridden. Misspellings of five
# letters and more, which is where messages go wrong, still fail.
# The output decides, not lintian's exit status (which pipefail would let
# hide its errors).
tags=$(lintian -I "$debdir"/gwagent_*.deb "$debdir"/gwagent-pkcs11_*.deb 2>&1 | grep -v 'root privileges' |
	grep -Ev '^I: [^ ]+ spelling-error-in-binary [a-z]{1,4} ' || true)
[ -z "$tags" ] || { echo "$tags"; fail "lintian reported the tags above"; }

step "reproducible build"
again=$(mktemp -d)
scratch=$(mktemp -d)
trap 'rm -rf "$again" "$scratch"' EXIT
./packaging/deb.sh "$again" amd64 amd64-pkcs11 >/dev/null
for d in "$deb" "$p11"; do
	cmp -s "$d" "$again/$(basename "$d")" || fail "two builds of $(basename "$d") differ"
done
# The PKCS#11 build declares the C library it was linked with.
for d in "$debdir"/gwagent-pkcs11_*.deb; do
	dpkg-deb -f "$d" Depends | grep -Eq '^libc6 \(>= 2\.[0-9]+\), ' || fail "$(basename "$d") does not depend on libc6: $(dpkg-deb -f "$d" Depends)"
done

# The scratch root: minbase + systemd (sysusers, tmpfiles), no tpm-udev,
# so the package itself must create group tss.
key=$(printf '%s\n' "$suite" minbase systemd v1 | sha256sum | cut -c1-16)
tarball=.cache/pkgtest/root-$suite-$key.tar
if [ ! -s "$tarball" ]; then
	step "building the scratch root ($suite, amd64; cached in $tarball)"
	mkdir -p .cache/pkgtest
	mmdebstrap --variant=minbase --include=systemd --mode=root --format=tar \
		--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
		"$suite" "$tarball.tmp" >/dev/null 2>.cache/pkgtest/mmdebstrap.log || { cat .cache/pkgtest/mmdebstrap.log >&2; fail "mmdebstrap"; }
	mv "$tarball.tmp" "$tarball"
fi
r=$scratch/root
mkdir "$r"
tar -C "$r" -xf "$tarball"
inroot() { chroot "$r" "$@"; }
mode() { chroot "$r" stat -c '%a %U %G' "$1" 2>/dev/null; }

step "install $version offline"
cp "$deb" "$r/tmp/"
inroot dpkg -i "/tmp/$(basename "$deb")" >/dev/null || fail "dpkg -i"
inroot getent passwd gwagent >/dev/null || fail "no user gwagent"
inroot getent group tss >/dev/null || fail "no group tss without tpm-udev"
inroot id -nG gwagent | grep -qw tss || fail "gwagent is not in group tss"
[ "$(mode /var/lib/gwagent)" = "700 gwagent gwagent" ] || fail "/var/lib/gwagent is $(mode /var/lib/gwagent)"
[ "$(mode /etc/gwagent)" = "750 root gwagent" ] || fail "/etc/gwagent is $(mode /etc/gwagent)"
# Every directory the tmpfiles snippet declares exists as declared.
while read -r type path m user group _; do
	[ "$type" = d ] || continue
	[ "$(mode "$path")" = "$(printf '%o' $((8#$m))) $user $group" ] || fail "$path is $(mode "$path"), want $m $user $group"
done < <(grep -v '^#' "$r/usr/lib/tmpfiles.d/gwagent.conf")
[ -L "$r/etc/systemd/system/multi-user.target.wants/gwagent.service" ] || fail "the unit is not enabled"
inroot gwagent version | grep -q "gwagent $version" || fail "gwagent version does not say $version"
grep -q 'BEGIN CERTIFICATE' "$r/etc/gwagent/azure-roots.pem" || fail "no trust bundle"
# Azure's roots, recognised by gwagent check (not Azure endpoints: ok either way, so ask with an Azure name).
sed 's/^dps_endpoint = .*/dps_endpoint = "global.azure-devices-provisioning.net"/' "$r/etc/gwagent/gwagent.toml" >"$r/tmp/azure.toml"
inroot gwagent check --config /tmp/azure.toml --json --timeout 1ms >"$r/tmp/check.json" 2>/dev/null || true
grep -A2 '"trust-bundle"' "$r/tmp/check.json" | grep -q '"ok"' || fail "gwagent check does not find Azure's roots in the packaged bundle: $(cat "$r/tmp/check.json")"

step "upgrade keeps the edited config, identity, keys and outbox"
sed -i 's/^registration_id = .*/registration_id = "gw-edited"/' "$r/etc/gwagent/gwagent.toml"
mkdir -p "$r/var/lib/gwagent/identity/gen-000001" "$r/var/lib/gwagent/keys" "$r/var/lib/gwagent/outbox"
echo gen-000001 >"$r/var/lib/gwagent/identity/current"
echo secret-key >"$r/var/lib/gwagent/keys/operational.key"
echo message >"$r/var/lib/gwagent/outbox/000001"
inroot chown -R gwagent:gwagent /var/lib/gwagent
sums() { (cd "$r/var/lib/gwagent" && find . -type f -exec sha256sum {} + | sort); }
before=$(sums)
up=$scratch/up
DEB_VERSION="$version+test1" ./packaging/deb.sh "$up" amd64 >/dev/null
cp "$up"/*.deb "$r/tmp/"
inroot dpkg -i "/tmp/gwagent_${version}+test1_amd64.deb" >/dev/null || fail "upgrade"
inroot gwagent version | grep -q "$version+test1" || fail "not upgraded"
grep -q 'registration_id = "gw-edited"' "$r/etc/gwagent/gwagent.toml" || fail "upgrade lost the edited config"
[ "$(sums)" = "$before" ] || fail "upgrade changed the state directory"
[ "$(mode /var/lib/gwagent)" = "700 gwagent gwagent" ] || fail "upgrade changed /var/lib/gwagent to $(mode /var/lib/gwagent)"

step "the PKCS#11 build replaces the static one and back, keeping config and state"
cp "$p11" "$r/tmp/"
inroot dpkg -i "/tmp/$(basename "$p11")" >/dev/null || fail "dpkg -i $(basename "$p11") over gwagent"
inroot gwagent version | grep -q 'pkcs11: yes' || fail "gwagent-pkcs11's binary has no PKCS#11: $(inroot gwagent version)"
inroot dpkg-query -W -f='${Status}' gwagent 2>/dev/null | grep -q 'install ok installed' && fail "gwagent still installed beside gwagent-pkcs11"
grep -q 'registration_id = "gw-edited"' "$r/etc/gwagent/gwagent.toml" || fail "switching to gwagent-pkcs11 lost the edited config"
[ "$(sums)" = "$before" ] || fail "switching to gwagent-pkcs11 changed the state directory"
[ -L "$r/etc/systemd/system/multi-user.target.wants/gwagent.service" ] || fail "the unit is not enabled after switching builds"
inroot dpkg -P gwagent >/dev/null 2>&1 || true
[ "$(sums)" = "$before" ] || fail "purging the replaced gwagent deleted gwagent-pkcs11's state"
grep -q 'gw-edited' "$r/etc/gwagent/gwagent.toml" || fail "purging the replaced gwagent deleted the config"
[ -L "$r/etc/systemd/system/multi-user.target.wants/gwagent.service" ] || fail "purging the replaced gwagent disabled the unit"
inroot dpkg -i "/tmp/gwagent_${version}+test1_amd64.deb" >/dev/null || fail "back to gwagent"
inroot gwagent version | grep -q 'pkcs11: no' || fail "not back on the static build"
[ "$(sums)" = "$before" ] || fail "switching back changed the state directory"

step "remove keeps state and config"
inroot dpkg -r gwagent >/dev/null || fail "dpkg -r"
[ ! -e "$r/usr/bin/gwagent" ] || fail "binary left after remove"
[ "$(sums)" = "$before" ] || fail "remove changed the state directory"
grep -q 'gw-edited' "$r/etc/gwagent/gwagent.toml" || fail "remove lost the config"
inroot dpkg -i "/tmp/$(basename "$deb")" >/dev/null || fail "reinstall after remove"
[ "$(sums)" = "$before" ] || fail "reinstall changed the state directory"

step "purge removes state and config"
inroot dpkg -P gwagent >/dev/null || fail "dpkg -P"
for p in /var/lib/gwagent /etc/gwagent /etc/systemd/system/multi-user.target.wants/gwagent.service; do
	[ ! -e "$r$p" ] && [ ! -L "$r$p" ] || fail "$p left after purge"
done
step "ok: $(basename "$deb") installs offline, upgrades, is replaced by $(basename "$p11") and back, removes and purges as promised; lintian clean; reproducible"
