# Shared by image-check.sh, factory-image.sh and factory-image-check.sh (sourced).

# rootfs_cache: prints the cache directory of the arm64 base system, kernel
# and initramfs, building it first if needed. The key is a hash of
# everything that decides its content.
rootfs_cache() {
	local key dir
	key=$(cat packaging/image/rootfs.sh | sha256sum | cut -c1-16)
	dir=.cache/image/rootfs-${IMAGE_SUITE:-trixie}-$key
	mkdir -p .cache/image
	if [ ! -e "$dir/initrd.img" ]; then
		echo "image: building the arm64 root file system into $dir (5-20 minutes, once)" >&2
		local t0=$SECONDS
		./packaging/image/rootfs.sh "$dir" >"$dir.log" 2>&1 || { tail -30 "$dir.log" >&2; echo "image: the whole log is $dir.log" >&2; return 1; }
		echo "image: root file system built in $((SECONDS - t0)) s" >&2
	fi
	echo "$dir"
}

# mkimage DIR IMAGE SIZE LABEL: an ext4 image of DIR, no loop mount.
mkimage() {
	rm -f "$2"
	mkfs.ext4 -q -F -L "$4" -E root_owner=0:0 -d "$1" "$2" "$3"
}

# stop_all DEST: ends what the check started (pids) and makes DEST, empty,
# for the logs, which must outlive the work directory also when the check
# failed.
stop_all() {
	local p
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$1"
	mkdir -p "$1"
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on.
free_port() {
	local p
	while :; do
		p=$((30000 + RANDOM % 30000))
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
	done
}

# start_azsim WORK: azsim in WORK on loopback ports, which the guest reaches
# as azsim.test:8883 (DPS), :8884 (hub) and :8480 (admin) through qemu's
# guestfwd (guestfwd_args). Sets dps, hub, admin, scope, bundle; appends
# its pid to pids.
start_azsim() {
	local w=$1
	dps=$(free_port) hub=$(free_port) admin=$(free_port)
	go build -o "$w/azsim" ./cmd/azsim
	"$w/azsim" serve --state "$w/azsim-state" --dps-addr "127.0.0.1:$dps" --hub-addr "127.0.0.1:$hub" \
		--admin-addr "127.0.0.1:$admin" --dps-https-addr 127.0.0.1:0 --dps-ws-addr off --hub-ws-addr off \
		--hub-hostname azsim.test:8884 --server-names azsim.test \
		--telemetry-log "$w/telemetry.jsonl" --info-file "$w/azsim.json" --retry-after 1 >"$w/azsim.log" 2>&1 &
	pids+=($!)
	for _ in $(seq 100); do [ -s "$w/azsim.json" ] && break; sleep 0.1; done
	[ -s "$w/azsim.json" ] || { cat "$w/azsim.log" >&2; return 1; }
	scope=$(sed -n 's/.*"idScope": *"\([^"]*\)".*/\1/p' "$w/azsim.json")
	bundle=$(sed -n 's/.*"trustBundle": *"\([^"]*\)".*/\1/p' "$w/azsim.json")
	export AZSIM_ADMIN=http://127.0.0.1:$admin
}

# guestfwd_args: qemu user-network options that connect the guest's
# 10.0.2.100 ports to azsim's loopback ports. With restrict=on the guest
# reaches nothing else; a hostfwd (bound to 127.0.0.1) may let the host in.
guestfwd_args() {
	local f
	for f in "8883 $dps" "8884 $hub" "8480 $admin"; do
		set -- $f
		printf ',guestfwd=tcp:10.0.2.100:%s-cmd:socat STDIO TCP4:127.0.0.1:%s' "$1" "$2"
	done
}

# start_swtpm DIR: a swtpm whose state (the TPM's NVRAM) lives in DIR and
# survives power cycles; prints nothing, sets swtpm_pid.
start_swtpm() {
	mkdir -p "$1"
	rm -f "$1/swtpm.sock"
	swtpm socket --tpm2 --tpmstate "dir=$1" --ctrl "type=unixio,path=$1/swtpm.sock" --log "file=$1/swtpm.log" &
	swtpm_pid=$!
	pids+=("$swtpm_pid")
	for _ in $(seq 100); do [ -S "$1/swtpm.sock" ] && break; sleep 0.1; done
}

# qemu_virt KERNEL INITRD TPMDIR CONSOLE ARGS... &: the arm64 virt machine
# with a TPM (tpm-tis-device on TPMDIR's swtpm), the serial console to
# the file CONSOLE, qemu's own messages to CONSOLE.qemu; ARGS add disks and
# the network. The virtio-net option ROM is not loaded (romfile=): the
# kernel is booted directly, no firmware needs it. Run it in the background:
# it execs qemu, so $! is qemu's pid.
qemu_virt() {
	local kernel=$1 initrd=$2 tpm=$3 console=$4
	shift 4
	exec qemu-system-aarch64 -M virt -cpu cortex-a57 -smp 2 -m 1024 -nographic -no-reboot \
		-kernel "$kernel" -initrd "$initrd" -append "root=/dev/vda rw console=ttyAMA0 panic=-1" \
		-chardev "socket,id=chrtpm,path=$tpm/swtpm.sock" -tpmdev emulator,id=tpm0,chardev=chrtpm \
		-device tpm-tis-device,tpmdev=tpm0 \
		-serial "file:$console" "$@" </dev/null >/dev/null 2>"$console.qemu"
}
