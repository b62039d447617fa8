package testenv

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// Tmpfs mounts a real tmpfs with mount options opts (for example
// "size=1m,nr_inodes=200") at dir, creating dir, and unmounts it when the
// test ends. A small tmpfs is a file system that really fills up: writes
// fail with ENOSPC as on a full flash partition. Mounting needs root
// (CAP_SYS_ADMIN); without it the test fails under
// GWAGENT_REQUIRE_DEVICES=1 (make test) and is skipped otherwise.
func Tmpfs(t testing.TB, dir, opts string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		msg := fmt.Sprintf("cannot mount a tmpfs at %s (%v): this test needs root to fill a real file system", dir, err)
		if os.Getenv("GWAGENT_REQUIRE_DEVICES") == "1" {
			t.Fatal("REQUIRED COMPONENT MISSING: " + msg)
		}
		t.Skip("SKIPPING: " + msg)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			// Something still holds a file open: detach it so the
			// temporary directory can go; the kernel frees it later.
			if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", dir, err)
			}
		}
	})
}

// Fill uses up the file system holding dir: one file grown until writes
// fail with ENOSPC, then, if inodes, empty files until no inode is left (on
// a tmpfs mounted with nr_inodes). It returns a function that deletes them
// again.
func Fill(t testing.TB, dir string, inodes bool) (free func()) {
	t.Helper()
	fill := filepath.Join(dir, ".fill")
	if err := os.Mkdir(fill, 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(fill, "blocks"))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, unix.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	f.Close()
	for i := 0; inodes; i++ {
		f, err := os.Create(filepath.Join(fill, fmt.Sprint(i)))
		if err != nil {
			if !errors.Is(err, unix.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
		f.Close()
		if i > 1_000_000 {
			t.Fatal("the file system at " + dir + " has no inode limit; mount it with nr_inodes")
		}
	}
	return func() {
		if err := os.RemoveAll(fill); err != nil {
			t.Error(err)
		}
	}
}
