package testenv

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// SWTPM is a running swtpm (a real software TPM 2.0) on a Unix socket.
type SWTPM struct {
	t    testing.TB
	Dir  string // state directory; survives Restart
	Sock string // pass as tpm2:socket=...
	cmd  *exec.Cmd
}

// StartSWTPM starts swtpm in socket mode on a temporary state directory and
// stops it when the test ends.
func StartSWTPM(t testing.TB) *SWTPM {
	t.Helper()
	bin := LookPath(t, "swtpm", "swtpm")
	// Not t.TempDir(): subtest names make paths longer than a Unix socket
	// address may be (108 bytes).
	dir, err := os.MkdirTemp("", "swtpm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &SWTPM{t: t, Dir: dir, Sock: filepath.Join(dir, "tpm.sock")}
	s.start(bin)
	t.Cleanup(s.Stop)
	return s
}

func (s *SWTPM) start(bin string) {
	s.t.Helper()
	os.Remove(s.Sock)
	ctrl := filepath.Join(s.Dir, "ctrl.sock")
	os.Remove(ctrl)
	cmd := exec.Command(bin, "socket", "--tpm2",
		"--server", "type=unixio,path="+s.Sock,
		"--ctrl", "type=unixio,path="+ctrl,
		"--tpmstate", "dir="+s.Dir,
		"--flags", "not-need-init,startup-clear")
	// swtpm logs every client disconnect; its output is not useful here.
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start swtpm: %v", err)
	}
	s.cmd = cmd
	// The socket file appears before swtpm accepts connections: wait for a
	// successful connect.
	for range 100 {
		if c, err := net.Dial("unix", s.Sock); err == nil {
			c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.Stop()
	s.t.Fatal("swtpm did not create its socket within 2s")
}

// Stop kills swtpm (idempotent).
func (s *SWTPM) Stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.cmd = nil
	}
}

// Restart stops swtpm and starts it again on the same state: persistent
// objects and the seeds survive, as on a reboot.
func (s *SWTPM) Restart() {
	s.t.Helper()
	s.Stop()
	s.start(LookPath(s.t, "swtpm", "swtpm"))
}
