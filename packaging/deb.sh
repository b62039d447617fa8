#!/usr/bin/env bash
# Builds gwagent's Debian packages from a staged tree with Debian's own
# dpkg-deb (--root-owner-group: no fakeroot). Reproducible: file times,
# the build time in the binary and the changelog date all come from
# SOURCE_DATE_EPOCH (default: the last commit's time).
#
# Usage: packaging/deb.sh OUTDIR TARGET...
#   TARGET amd64, arm64, armhf: package gwagent, the CGO-free static build
#          (TPM 2.0 and file keys): runs on any Debian release, needs no
#          libraries.
#   TARGET amd64-pkcs11, arm64-pkcs11: package gwagent-pkcs11, the cgo build
#          that also loads PKCS#11 modules (dlopen). Built with Debian's C
#          compilers (gcc, gcc-aarch64-linux-gnu); its Depends on the C
#          library come from dpkg-shlibdeps. The two packages conflict and
#          replace each other: switching keeps config, identity and keys.
# Env:   DEB_VERSION  override the Debian version (tests build "upgrades")
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: packaging/deb.sh OUTDIR TARGET...}
shift
[ $# -gt 0 ] || set -- amd64 arm64 armhf amd64-pkcs11 arm64-pkcs11
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
	[github.com/ThalesGroup/crypto11]="MIT"
	[github.com/eclipse/paho.mqtt.golang]="EPL-2.0 or BSD-3-Clause (Eclipse Distribution License 1.0)"
	[github.com/fsnotify/fsnotify]="BSD-3-Clause"
	[github.com/google/go-tpm]="Apache-2.0"
	[github.com/gorilla/websocket]="BSD-2-Clause"
	[github.com/miekg/pkcs11]="BSD-3-Clause; its PKCS#11 headers: Copyright OASIS Open 2016, distributed under the OASIS IPR Policy"
	[github.com/pelletier/go-toml/v2]="MIT"
	[github.com/pkg/errors]="BSD-2-Clause"
	[github.com/thales-e-security/pool]="Apache-2.0"
	[golang.org/x/net]="BSD-3-Clause"
	[golang.org/x/sync]="BSD-3-Clause"
	[golang.org/x/sys]="BSD-3-Clause"
)

# shlibdeps ARCH BINARY: the Depends on shared libraries dpkg-shlibdeps
# finds for BINARY (for a cross build through the cross C library's shlibs
# file, which qualifies the package with the architecture: dropped, the
# package is of that architecture itself).
shlibdeps() {
	local d libdir=/usr/lib/$(dpkg-architecture -a"$1" -qDEB_HOST_MULTIARCH 2>/dev/null)
	d=$(mktemp -d)
	mkdir "$d/debian"
	printf 'Source: gwagent\n\nPackage: gwagent-pkcs11\nArchitecture: any\n' >"$d/debian/control"
	local cross=/usr/$(dpkg-architecture -a"$1" -qDEB_HOST_GNU_TYPE 2>/dev/null)/lib
	(cd "$d" && DEB_HOST_ARCH=$1 dpkg-shlibdeps -O -l"$cross" -l"$libdir" "$2" 2>/dev/null) |
		sed -n 's/^shlibs:Depends=//p' | sed "s/:$1//g"
	rm -rf "$d"
}

for target in "$@"; do
	arch=${target%-pkcs11}
	pkg=gwagent
	case $target in
	amd64) goenv=(GOARCH=amd64) ;;
	arm64) goenv=(GOARCH=arm64) ;;
	armhf) goenv=(GOARCH=arm GOARM=7) ;;
	amd64-pkcs11) goenv=(GOARCH=amd64 CC=x86_64-linux-gnu-gcc) ;;
	arm64-pkcs11) goenv=(GOARCH=arm64 CC=aarch64-linux-gnu-gcc) ;;
	*) echo "deb.sh: unknown target $target (amd64, arm64, armhf, amd64-pkcs11, arm64-pkcs11)" >&2; exit 1 ;;
	esac
	if [ "$target" != "$arch" ]; then
		pkg=gwagent-pkcs11 other=gwagent
		# Debian's hardening for the C part (the PKCS#11 binding) and the
		# link: PIE, fortified functions, stack protector, full RELRO.
		flags() { DEB_BUILD_MAINT_OPTIONS=hardening=+all DEB_HOST_ARCH=$arch dpkg-buildflags --get "$1"; }
		goenv+=(CGO_ENABLED=1 "CGO_CPPFLAGS=$(flags CPPFLAGS)" "CGO_CFLAGS=$(flags CFLAGS)" "CGO_LDFLAGS=$(flags LDFLAGS)")
		gobuild=(-buildmode=pie)
		cc=${goenv[1]#CC=}
		command -v "$cc" >/dev/null || { echo "deb.sh: $cc missing: apt-get install gcc-${cc%-gcc} (testdata/install-deps.sh --deb)" >&2; exit 1; }
	else
		other=gwagent-pkcs11
		goenv+=(CGO_ENABLED=0) gobuild=(-tags nopkcs11)
	fi
	stage=$(mktemp -d)
	trap 'rm -rf "$stage"' EXIT
	root=$stage/root
	install -d -m 0755 "$root"/DEBIAN "$root"/usr/bin "$root"/usr/lib/systemd/system "$root"/usr/lib/sysusers.d \
		"$root"/usr/lib/tmpfiles.d "$root"/etc/gwagent "$root/usr/share/doc/$pkg" "$root"/usr/share/lintian/overrides "$root"/usr/share/man/man1

	# Compiled as the Makefile compiles what ships.
	. ./packaging/ship-env
	env GOOS=linux "${goenv[@]}" GOFLAGS="$GOFLAGS -buildvcs=false" go build -trimpath "${gobuild[@]}" \
		-ldflags "-s -w -buildid= -X main.version=$version -X main.buildTime=$buildtime" -o "$root/usr/bin/gwagent" ./cmd/gwagent
	chmod 0755 "$root/usr/bin/gwagent"
	if [ "$pkg" != gwagent ]; then
		# The C compiler's version notes, which lintian counts as waste.
		"${cc%gcc}objcopy" --remove-section=.comment "$root/usr/bin/gwagent"
	fi

	install -m 0644 systemd/gwagent.service "$root/usr/lib/systemd/system/gwagent.service"
	install -m 0644 systemd/gwagent.sysusers "$root/usr/lib/sysusers.d/gwagent.conf"
	install -m 0644 systemd/gwagent.tmpfiles "$root/usr/lib/tmpfiles.d/gwagent.conf"
	install -m 0644 configs/gwagent.toml "$root/etc/gwagent/gwagent.toml"
	for r in "${roots[@]}"; do cat "$mozilla/$r.crt"; done >"$root/etc/gwagent/azure-roots.pem"
	chmod 0644 "$root/etc/gwagent/azure-roots.pem"

	doc=$root/usr/share/doc/$pkg
	gzip -9n <README.md >"$doc/README.md.gz"
	{
		echo "$pkg ($version) unstable; urgency=medium"
		echo
		echo "  * Built from git commit $commit."
		echo
		echo " -- $maint  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
	} | gzip -9n >"$doc/changelog.gz"
	{
		echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
		echo "Upstream-Name: gwagent"
		if [ "$pkg" = gwagent ]; then
			echo "Comment: /usr/bin/gwagent is a statically linked Go program; it contains"
		else
			echo "Comment: /usr/bin/gwagent is a Go program linked with the C library; it contains"
		fi
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
	# The overrides are gwagent's; the cgo build is not statically linked.
	if [ "$pkg" = gwagent ]; then
		install -m 0644 packaging/deb/lintian-overrides "$root/usr/share/lintian/overrides/$pkg"
	else
		grep -v 'statically-linked-binary\|CGO-free\|separate flavour\|and on gateways without' packaging/deb/lintian-overrides |
			sed "s/^gwagent:/$pkg:/" >"$root/usr/share/lintian/overrides/$pkg"
		chmod 0644 "$root/usr/share/lintian/overrides/$pkg"
	fi

	for s in postinst prerm postrm; do install -m 0755 "packaging/deb/$s" "$root/DEBIAN/$s"; done
	printf '/etc/gwagent/gwagent.toml\n/etc/gwagent/azure-roots.pem\n' >"$root/DEBIAN/conffiles"
	(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
	size=$(du -k -s --apparent-size --exclude=DEBIAN "$root" | cut -f1)
	depends="systemd | systemd-standalone-sysusers | systemd-sysusers"
	provides=""
	if [ "$pkg" = gwagent ]; then
		flavour=" This package holds the CGO-free static build: keys in a TPM 2.0
 (/dev/tpmrm0, group tss) or in files. It has no PKCS#11 support; the
 gwagent-pkcs11 package has."
		short="IoT gateway agent for Azure IoT Hub DPS and IoT Hub"
	else
		flavour=" This package holds the build that also uses keys in a PKCS#11 token
 (a secure element, a smart card, SoftHSM2) through the token's module,
 besides a TPM 2.0 and files. It replaces the gwagent package."
		short="IoT gateway agent for Azure IoT Hub DPS and IoT Hub (PKCS#11)"
		depends="$(shlibdeps "$arch" "$root/usr/bin/gwagent"), $depends"
		# Whatever depends on gwagent is content with either build.
		provides="Provides: gwagent
"
	fi
	cat >"$root/DEBIAN/control" <<CONTROL
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: $maint
Installed-Size: $size
Depends: $depends
Recommends: ca-certificates, tpm-udev
Conflicts: $other
Replaces: $other
${provides}Section: net
Priority: optional
Description: $short
 gwagent runs as an unprivileged systemd service on a Linux gateway. It
 registers with the Device Provisioning Service using a factory credential
 (an X.509 onboarding certificate or a symmetric key), gets an operational
 certificate for a P-384 key that never leaves the device, sends telemetry
 to IoT Hub over MQTT, and renews the certificate before it expires.
 .
$flavour
 Run "gwagent check" after configuring /etc/gwagent/gwagent.toml.
CONTROL

	find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
	deb=$out/${pkg}_${version}_$arch.deb
	dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
	rm -rf "$stage"
	trap - EXIT
	printf '%-44s %8d bytes (installed %d KiB)\n' "$(basename "$deb")" "$(stat -c %s "$deb")" "$size"
done
