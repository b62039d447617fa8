package telemetry

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// The retirer's unlink, raw on a local file system and scheduled on any
// other, removes the file and reports a missing one as ENOENT either way
// (retireFiles counts a missing file as gone already).
func TestRetireUnlinkat(t *testing.T) {
	dir := t.TempDir()
	var q retireQueue
	defer q.closeDir()
	dfd, err := q.dirFD(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !q.raw {
		t.Fatalf("the test's temporary directory %s is not on a local file system by localFS", dir)
	}
	for _, raw := range []bool{true, false} {
		q.raw = raw
		f := filepath.Join(dir, "m.json")
		if err := os.WriteFile(f, []byte(`{}`), 0o640); err != nil {
			t.Fatal(err)
		}
		if err := q.unlinkat(dfd, "m.json"); err != nil {
			t.Fatalf("raw %v: %v", raw, err)
		}
		if _, err := os.Lstat(f); !os.IsNotExist(err) {
			t.Fatalf("raw %v: the file is still there (%v)", raw, err)
		}
		if err := q.unlinkat(dfd, "m.json"); !errors.Is(err, unix.ENOENT) {
			t.Fatalf("raw %v: unlinking a missing file: %v, want ENOENT", raw, err)
		}
	}
}

// Local storage and memory file systems get raw unlinks; a directory whose
// file system type is not known to be local (here /proc) does not.
func TestLocalFS(t *testing.T) {
	for dir, want := range map[string]bool{t.TempDir(): true, "/dev/shm": true, "/proc": false} {
		fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if got := localFS(fd); got != want {
			t.Errorf("localFS(%s) = %v, want %v", dir, got, want)
		}
		unix.Close(fd)
	}
}
