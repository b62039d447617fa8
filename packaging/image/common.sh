# Shared by image-check.sh and factory-image.sh (sourced).
# rootfs_cache: prints the cache directory of the arm64 root file system,
# kernel and initramfs, building it first if needed. The key is a hash of
# everything that decides its content.
rootfs_cache() {
	local key dir
	key=$(cat packaging/image/rootfs.sh | sha256sum | cut -c1-16)
	dir=.cache/image/rootfs-${IMAGE_SUITE:-trixie}-$key
	if [ ! -e "$dir/initrd.img" ]; then
		echo "image: building the arm64 root file system into $dir (10-20 minutes, once)" >&2
		local t0=$SECONDS
		./packaging/image/rootfs.sh "$dir" >"$dir.log" 2>&1 || { tail -30 "$dir.log" >&2; return 1; }
		echo "image: root file system built in $((SECONDS - t0)) s" >&2
	fi
	echo "$dir"
}

# mkimage DIR IMAGE SIZE LABEL: an ext4 image of DIR, no loop mount.
mkimage() {
	rm -f "$2"
	mkfs.ext4 -q -F -L "$4" -E root_owner=0:0 -d "$1" "$2" "$3"
}
