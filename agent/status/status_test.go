package status

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A FIFO planted as status.json is refused at once (opening it for reading
// would block `gwagent status` until a writer came, deaf to SIGTERM), and
// a link to an endless device is refused, not read.
func TestReadNeverBlocksOnAFIFO(t *testing.T) {
	dir := t.TempDir()
	if err := syscall.Mkfifo(filepath.Join(dir, "status.json"), 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if _, err := Read(dir); err == nil || !strings.Contains(err.Error(), "is a FIFO") {
			t.Errorf("Read on a FIFO: %v", err)
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("blocked on a FIFO")
	}
	os.Remove(filepath.Join(dir, "status.json"))
	os.Symlink("/dev/zero", filepath.Join(dir, "status.json"))
	if _, err := Read(dir); err == nil || !strings.Contains(err.Error(), "is a device") {
		t.Errorf("Read on /dev/zero: %v", err)
	}
}
