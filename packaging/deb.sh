#!/usr/bin/env bash
# Builds gwagent_VERSION_ARCH.deb from a staged tree with Debian's own
# dpkg-deb (--root-owner-group: no fakeroot). Reproducible: file times,
# the build time in the binary and the changelog date all come from
# SOURCE_DATE_EPOCH (default: the last commit's time).
#
# Usage: packaging/deb.sh OUTDIR ARCH...      ARCH: amd64 arm64 armhf
# Env:   DEB_VERSION  override the Debian version (tests build "upgrades")
#
# Each package holds the CGO-free static build (TPM 2.0 and file keys, no
# PKCS#11): it runs on any Debian release and needs no libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: packaging/deb.sh OUTDIR ARCH...}
shift
[ $# -gt 0 ] || set -- amd64 arm64 armhf
mkdir -p "$out"

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

# A valid Debian version that sorts by build: 1.2.3 from tag v1.2.3,
# 1.2.3+git5.HASH five commits later, and without any tag 0~gitDATE.HASH
# (a bare `git describe` hash would start with a letter, which dpkg rejects).
debian_version() {
	local d
	if d=$(git describe --tags --long --match 'v[0-9]*' 2>/dev/null); then
		local tag=${d%-*-g*} rest=${d#"${d%-*-g*}"-}
		local n=${rest%%-*}
		if [ "$n" = 0 ]; then echo "${tag#v}"; else echo "${tag#v}+git$n.$commit"; fi
	else
		echo "0~git$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d%H%M%S).$commit"
	fi
}
version=${DEB_VERSION:-$(debian_version)}
dpkg --validate-version "$version" || { echo "deb.sh: $version is not a valid Debian version" >&2; exit 1; }
buildtime=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
maint="gwagent developers <gwagent@lists.gwagent.dev>"

# Azure's roots, from Debian's ca-certificates (not pasted by hand).
mozilla=/usr/share/ca-certificates/mozilla
roots=(DigiCert_Global_Root_G2 Microsoft_RSA_Root_Certificate_Authority_2017 Microsoft_ECC_Root_Certificate_Authority_2017)
for r in "${roots[@]}"; do
	[ -r "$mozilla/$r.crt" ] || { echo "deb.sh: $mozilla/$r.crt missing: apt-get install ca-certificates" >&2; exit 1; }
done

# Licenses of what is compiled into the binary; a module not listed here
# stops the build, so debian/copyright never silently goes stale.
declare -A license=(
	[github.com/eclipse/paho.mqtt.golang]="EPL-2.0 or BSD-3-Clause (Eclipse Distribution License 1.0)"
	[github.com/fsnotify/fsnotify]="BSD-3-Clause"
	[github.com/google/go-tpm]="Apache-2.0"
	[github.com/gorilla/websocket]="BSD-2-Clause"
	[github.com/pelletier/go-toml/v2]="MIT"
	[golang.org/x/net]="BSD-3-Clause"
	[golang.org/x/sync]="BSD-3-Clause"
	[golang.org/x/sys]="BSD-3-Clause"
)

for arch in "$@"; do
	case $arch in
	amd64) goenv=(GOARCH=amd64) ;;
	arm64) goenv=(GOARCH=arm64) ;;
	armhf) goenv=(GOARCH=arm GOARM=7) ;;
	*) echo "deb.sh: unknown architecture $arch (amd64, arm64, armhf)" >&2; exit 1 ;;
	esac
	stage=$(mktemp -d)
	trap 'rm -rf "$stage"' EXIT
	root=$stage/root
	install -d -m 0755 "$root"/DEBIAN "$root"/usr/bin "$root"/usr/lib/systemd/system "$root"/usr/lib/sysusers.d \
		"$root"/usr/lib/tmpfiles.d "$root"/etc/gwagent "$root"/usr/share/doc/gwagent "$root"/usr/share/lintian/overrides "$root"/usr/share/man/man1

	env CGO_ENABLED=0 GOOS=linux "${goenv[@]}" GOFLAGS="${GOFLAGS:-} -buildvcs=false" go build -trimpath -tags nopkcs11 \
		-ldflags "-s -w -buildid= -X main.version=$version -X main.buildTime=$buildtime" -o "$root/usr/bin/gwagent" ./cmd/gwagent
	chmod 0755 "$root/usr/bin/gwagent"

	install -m 0644 systemd/gwagent.service "$root/usr/lib/systemd/system/gwagent.service"
	install -m 0644 systemd/gwagent.sysusers "$root/usr/lib/sysusers.d/gwagent.conf"
	install -m 0644 systemd/gwagent.tmpfiles "$root/usr/lib/tmpfiles.d/gwagent.conf"
	install -m 0644 configs/gwagent.toml "$root/etc/gwagent/gwagent.toml"
	for r in "${roots[@]}"; do cat "$mozilla/$r.crt"; done >"$root/etc/gwagent/azure-roots.pem"
	chmod 0644 "$root/etc/gwagent/azure-roots.pem"

	doc=$root/usr/share/doc/gwagent
	gzip -9n <README.md >"$doc/README.md.gz"
	{
		echo "gwagent ($version) unstable; urgency=medium"
		echo
		echo "  * Built from git commit $commit."
		echo
		echo " -- $maint  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
	} | gzip -9n >"$doc/changelog.gz"
	{
		echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
		echo "Upstream-Name: gwagent"
		echo "Comment: /usr/bin/gwagent is a statically linked Go program; it contains"
		echo " the Go standard library (BSD-3-Clause) and the Go modules below."
		echo
		echo "Files: *"
		echo "Copyright: 2025-2026 the gwagent developers"
		echo "License: other"
		echo " No license has been chosen yet; distribution terms are set by the project."
		go version -m "$root/usr/bin/gwagent" | awk '$1 == "dep" {print $2, $3}' | while read -r mod ver; do
			[ -n "${license[$mod]:-}" ] || { echo "deb.sh: no license recorded for $mod; add it to packaging/deb.sh" >&2; exit 1; }
			echo
			echo "Files: vendored Go module $mod $ver"
			echo "Copyright: the $mod authors"
			echo "License: ${license[$mod]}"
		done
	} >"$doc/copyright"
	gzip -9n <packaging/deb/gwagent.1 >"$root/usr/share/man/man1/gwagent.1.gz"
	install -m 0644 packaging/deb/lintian-overrides "$root/usr/share/lintian/overrides/gwagent"

	for s in postinst prerm postrm; do install -m 0755 "packaging/deb/$s" "$root/DEBIAN/$s"; done
	printf '/etc/gwagent/gwagent.toml\n/etc/gwagent/azure-roots.pem\n' >"$root/DEBIAN/conffiles"
	(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
	size=$(du -k -s --apparent-size --exclude=DEBIAN "$root" | cut -f1)
	cat >"$root/DEBIAN/control" <<CONTROL
Package: gwagent
Version: $version
Architecture: $arch
Maintainer: $maint
Installed-Size: $size
Depends: systemd | systemd-standalone-sysusers | systemd-sysusers
Recommends: ca-certificates, tpm-udev
Section: net
Priority: optional
Description: IoT gateway agent for Azure IoT Hub DPS and IoT Hub
 gwagent runs as an unprivileged systemd service on a Linux gateway. It
 registers with the Device Provisioning Service using a factory credential
 (an X.509 onboarding certificate or a symmetric key), gets an operational
 certificate for a P-384 key that never leaves the device, sends telemetry
 to IoT Hub over MQTT, and renews the certificate before it expires.
 .
 This package holds the CGO-free static build: keys in a TPM 2.0
 (/dev/tpmrm0, group tss) or in files. It has no PKCS#11 support.
 Run "gwagent check" after configuring /etc/gwagent/gwagent.toml.
CONTROL

	find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
	deb=$out/gwagent_${version}_$arch.deb
	dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
	rm -rf "$stage"
	trap - EXIT
	printf '%-44s %8d bytes (installed %d KiB)\n' "$(basename "$deb")" "$(stat -c %s "$deb")" "$size"
done
