package statelock

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// One agent per state directory, and a lock file nobody can turn against
// the agent: a symbolic link planted in its place is refused without
// touching its target, and a second holder is told who runs.
func TestTakeAttacks(t *testing.T) {
	dir := t.TempDir()
	l, err := Take(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Take(dir); !errors.Is(err, ErrAlreadyRunning) || !strings.Contains(err.Error(), "stop it first") {
		t.Fatalf("second lock: %v", err)
	}
	if pid, err := Holder(dir); err != nil || pid != os.Getpid() {
		t.Fatalf("holder %d %v, want %d", pid, err, os.Getpid())
	}
	l.Unlock()

	// A hostile local user with write access to the directory swaps the
	// lock file for a link to a file the service can write.
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(victim, []byte("precious\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	lf := filepath.Join(dir, File)
	os.Remove(lf)
	if err := os.Symlink(victim, lf); err != nil {
		t.Fatal(err)
	}
	_, err = Take(dir)
	if err == nil || !strings.Contains(err.Error(), "symbolic link") || !strings.Contains(err.Error(), "remove it") {
		t.Fatalf("lock through a symlink: %v", err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious\n" {
		t.Fatalf("the link's target was written: %q", b)
	}
	os.Remove(lf)
	if err := os.Mkdir(lf, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := Take(dir); err == nil || !strings.Contains(err.Error(), "is a directory; remove it") {
		t.Fatalf("lock file is a directory: %v", err)
	}
}

// A state directory on a read-only file system (a board whose overlay
// failed to mount) says so and what to do.
func TestTakeReadOnly(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED LOUDLY: mounting a read-only tmpfs needs root (CI runs as root)")
	}
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	if out, err := exec.Command("mount", "-o", "remount,ro", mnt).CombinedOutput(); err != nil {
		t.Fatalf("remount ro: %v %s", err, out)
	}
	for _, dir := range []string{mnt, filepath.Join(mnt, "state")} {
		_, err := Take(dir)
		if err == nil || !strings.Contains(err.Error(), "read-only file system") || !strings.Contains(err.Error(), "writable storage") {
			t.Errorf("%s: %v", dir, err)
		}
	}
}

// A FIFO, device or socket planted as the lock file is refused at once:
// opening a FIFO for reading blocks until a writer comes, which hung
// `gwagent status` for good, deaf to SIGTERM.
func TestNeverBlocksOnAFIFO(t *testing.T) {
	dir := t.TempDir()
	if err := syscall.Mkfifo(filepath.Join(dir, File), 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if pid, err := Holder(dir); err == nil || !strings.Contains(err.Error(), "is a FIFO") {
			t.Errorf("Holder on a FIFO: pid %d, err %v", pid, err)
		}
		if _, err := Take(dir); err == nil || !strings.Contains(err.Error(), "is a FIFO") || !strings.Contains(err.Error(), "remove it") {
			t.Errorf("Take on a FIFO: %v", err)
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("blocked on a FIFO")
	}
}
