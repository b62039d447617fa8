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
// retirerIn opens a temporary directory as the retirer's.
func retirerIn(t *testing.T) (q *retireQueue, dfd int, dir string) {
	t.Helper()
	dir = t.TempDir()
	q = &retireQueue{}
	t.Cleanup(q.closeDir)
	dfd, err := q.dirFD(dir)
	if err != nil {
		t.Fatal(err)
	}
	return q, dfd, dir
}

func TestRetireUnlinkat(t *testing.T) {
	q, dfd, dir := retirerIn(t)
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

// The retirer's raw lstatat says what x/sys's Fstatat says, never follows
// a symbolic link, and refuses a name holding a NUL, as x/sys does.
func TestRetireLstatat(t *testing.T) {
	q, dfd, dir := retirerIn(t)
	if !q.raw || !rawFstatat {
		t.Logf("raw %v, rawFstatat %v: the scheduled call is tested", q.raw, rawFstatat)
	}
	if err := os.WriteFile(filepath.Join(dir, "a-long-name-first.json"), []byte(`{"a":1}`), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("a-long-name-first.json", filepath.Join(dir, "l.json")); err != nil {
		t.Fatal(err)
	}
	// A long name first: the buffer is reused for the shorter ones after.
	for _, name := range []string{"a-long-name-first.json", "l.json"} {
		var got, want unix.Stat_t
		if err := q.lstatat(dfd, name, &got); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := unix.Fstatat(dfd, name, &want, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			t.Fatal(err)
		}
		if sigOfUnix(&got) != sigOfUnix(&want) || got.Mode != want.Mode {
			t.Errorf("%s: lstatat %+v, Fstatat %+v", name, sigOfUnix(&got), sigOfUnix(&want))
		}
	}
	var st unix.Stat_t
	if err := q.lstatat(dfd, "l.json", &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFLNK {
		t.Errorf("l.json: mode %o, %v; want the link itself", st.Mode, err)
	}
	if err := q.lstatat(dfd, "gone.json", &st); !errors.Is(err, unix.ENOENT) {
		t.Errorf("a missing file: %v, want ENOENT", err)
	}
	if err := q.lstatat(dfd, "a\x00b.json", &st); !errors.Is(err, unix.EINVAL) {
		t.Errorf("a name with a NUL: %v, want EINVAL", err)
	}
	if err := q.unlinkat(dfd, "a\x00b.json"); !errors.Is(err, unix.EINVAL) {
		t.Errorf("unlinking a name with a NUL: %v, want EINVAL", err)
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
